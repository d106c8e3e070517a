"""The config's `plugins`: modules imported before the config is read, each registering catalog entries of its own."""

from __future__ import annotations

import importlib
import re

from quantlib.errors import ConfigError


def load_plugins(modules) -> None:
    """Import the config's `plugins` (module names, found on PYTHONPATH), each of which registers catalog entries of
    its own when imported (docs/adding-a-method.md, "A worked example, as a plugin"). Python imports a module once per
    process, so loading the same plugins again registers nothing twice."""
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"config plugins: expected a list of module names, got {modules!r}")
    for module in modules:
        if module.endswith(".py") or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
            raise ConfigError(f"plugins: '{module}' is not a module name (my_methods, not my_methods.py or a path); "
                              "put its folder on PYTHONPATH and list the module's name")
        try:
            importlib.import_module(module)
        except Exception as exc:  # any failure of a plugin's own code is reported as a config error naming it
            absent = isinstance(exc, ModuleNotFoundError) and f"{module}.".startswith(f"{exc.name}.")
            hint = "add its folder to PYTHONPATH" if absent else "the error is in the plugin or what it imports"
            raise ConfigError(f"plugins: cannot import '{module}' ({type(exc).__name__}: {exc}); {hint}") from exc

"""The workflow configuration, by job: its schema and messages (`schema`), its expansion into specs, artifact paths
and tables (`experiment`), and the checks of its sources before any job (`preflight`). Pure Python: the Snakefile
imports it at parse time."""

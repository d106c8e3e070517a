"""Orthogonal transforms shared by incoherence processing (QTIP) and rotations (QuaRot, SpinQuant)."""

"""Fuzz targets of issue 14 and their drivers (see fuzz/README.md).

``fuzz.targets`` holds the targets -- ``api`` (engine and reference in lock step),
``trace`` (the trace readers and the lackey converter) and ``cli`` (the command's argument
handling) -- each a function of one byte string that raises ``fuzz.targets.Finding`` (or
crashes) on a defect.  ``python -m fuzz.run`` drives them: under atheris (coverage-guided)
when it is installed and asked for, else with random bytes from a seed.
"""

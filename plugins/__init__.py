"""normcore.plugins: normalization methods built only on normcore's public toolkit.

Installed as the subpackage ``normcore.plugins`` (from the top-level ``plugins/`` folder).
"""

from normcore.plugins import switchable  # noqa: E402,F401 - registers the SwitchableNorm names

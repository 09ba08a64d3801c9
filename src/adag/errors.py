"""The one exception type users see for bad input.

Its message is a single line that names the problem and the fix; the CLI prints it and exits 2.
"""

from __future__ import annotations


class AdagError(ValueError):
    """Bad input: a wrong model name, a malformed config, an over-long prompt, ..."""

"""Terminal escape codes (colours, cursor moves) as Ray and tqdm write them into captured text.

One pattern for every place that reads console output back: the quiet console, the driver's stage
errors and the decoders' captured warnings.
"""

from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

"""The one ``PathLike`` of the project: what every function taking a file or folder accepts."""

from __future__ import annotations

import os
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]

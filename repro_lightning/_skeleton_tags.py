"""The vocabulary the skeleton's writer and reader must agree on, and nothing else.

Why a module of its own: ``_skeleton_write`` and ``_skeleton_read`` are the two halves of one file
format, and each must use the same format name, depth limit, Lightning ``AttributeDict`` modules
and path flavours. Keeping those here (rather than in either half, or in the ``_skeleton`` facade
that imports both) lets the halves import them without importing each other, so the import graph
stays acyclic. The node grammar itself is documented in :mod:`repro_lightning._skeleton`.
"""

from __future__ import annotations

import os
import pathlib
import reprlib

FORMAT = "repro-lightning-checkpoint/1"

# Real checkpoints nest ~6 levels. Encoding and decoding recurse (about 4 frames a level on
# Python 3.11), so 100 stays well inside the interpreter's default limit of 1000 frames while a
# forged file cannot drive either side into a RecursionError.
_MAX_DEPTH = 100
_ATTRIBUTE_DICTS = ("lightning.pytorch.utilities.parsing", "lightning.fabric.utilities.data",
                    "pytorch_lightning.utilities.parsing", "lightning_fabric.utilities.data")
_PATHS: dict[type, str] = {pathlib.PosixPath: "posix", pathlib.WindowsPath: "windows",
                           pathlib.PurePosixPath: "pureposix",
                           pathlib.PureWindowsPath: "purewindows"}
_POSIX = os.name != "nt"  # a path saved on the other kind of system comes back pure
_PATH_TYPES: dict[str, type[pathlib.PurePath]] = {
    "posix": pathlib.PosixPath if _POSIX else pathlib.PurePosixPath,
    "windows": pathlib.PureWindowsPath if _POSIX else pathlib.WindowsPath,
    "pureposix": pathlib.PurePosixPath, "purewindows": pathlib.PureWindowsPath}
_REPR = reprlib.Repr()  # bounded repr for messages: a forged node may be 100 MB deep
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_short = _REPR.repr

"""A Lightning checkpoint as one safetensors file, without pickle.

Why: ``torch.save`` pickles the checkpoint, and unpickling runs whatever code the file names,
so a checkpoint pulled from a shared store could run anything on load. Here every tensor is a
safetensors tensor (raw bytes) and everything else is a JSON *skeleton* kept in the header's
``__metadata__``; loading reads bytes and JSON only. The skeleton is exact — a tuple stays a
tuple, int keys stay int, ``OrderedDict._metadata`` (which ``load_state_dict`` consults for
version-dependent loading) survives — because a resumed run must see what was saved.

Skeleton: ``{"root": node}`` where a node is one of

=================================  ==========================================================
JSON str / int / true / false / null  the same value
``["f", repr]`` ``["c", re, im]``  float (exact, inf and -0.0 too; a NaN loads as nan), complex
``["l", [n…]]`` ``["t", [n…]]``    list, tuple
``["d", [[k, v]…]]``               dict; keys are nodes too (int/tuple/None keys kept), in order
``["o", pairs]`` / ``["o", pairs, meta]``  OrderedDict, with its ``_metadata`` attribute if any
``["AD", pairs, module]``          Lightning ``AttributeDict`` (``module`` says which one)
``["ns", [[name, v]…]]``           argparse.Namespace
``["OC", kind, node]`` ``["OCT", kind]``  OmegaConf DictConfig/ListConfig (unresolved), its class
``["set", [n…]]`` ``["fs", [n…]]``  set, frozenset (sorted by encoded text: deterministic)
``["T", name]``                    the tensor stored as ``name``
``["nd", name, dtype, shape]``     numpy array (not object dtype) whose data is tensor ``name``
``["npv", dtype, node]``           numpy scalar of that dtype
``["b", b64]`` ``["ba", b64]``     bytes, bytearray
``["P", flavour, text]``           pathlib path: posix / windows / pureposix / purewindows
``["dt", name]`` ``["dev", text]`` ``["S", [ints]]``  torch.dtype, torch.device, torch.Size
=================================  ==========================================================

Anything else (a module, a function, an Enum, a custom object, a tensor subclass, a sparse or
meta tensor) is refused with :class:`CheckpointEncodingError` naming its key path, never
dropped or ``str()``-ed. Files read back are untrusted: malformed content of any kind is an
:class:`~repro_core.errors.IntegrityError`.

Layout: this module is the stable import path and holds no logic. ``_skeleton_write`` encodes a
checkpoint and streams the file, ``_skeleton_read`` reads a file and decodes it, and
``_skeleton_tags`` holds what both must agree on; neither half imports the other.
"""

from __future__ import annotations

from repro_lightning._skeleton_read import decode, is_repro_checkpoint, load, read_metadata
from repro_lightning._skeleton_tags import FORMAT
from repro_lightning._skeleton_write import CheckpointEncodingError, encode, payload

__all__ = ["FORMAT", "CheckpointEncodingError", "decode", "encode", "is_repro_checkpoint",
           "load", "payload", "read_metadata"]

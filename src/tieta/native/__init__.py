"""tieta's native kernels: small C files compiled on first use and loaded with ctypes.

Nothing here is needed for correctness: every kernel has a tensor implementation that is used
whenever the kernel can't be (no C compiler, GPU tensors, gradients, other dtypes). The
compiled library is cached under ``$TIETA_HOME/native``, keyed by the source, compiler and
machine, so it is built once per machine. ``TIETA_NATIVE=0`` switches the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from tieta.home import tieta_home

_SOURCES = Path(__file__).parent
_held_off = 0  # depth of open tensor_code() contexts


def native_enabled() -> bool:
    """False when ``TIETA_NATIVE=0`` or inside ``tensor_code()``."""
    return not _held_off and os.environ.get("TIETA_NATIVE", "1") != "0"


@contextlib.contextmanager
def tensor_code():
    """Run the tensor implementations inside this block, e.g. where torch's FLOP counter must
    see every operation (a native call is invisible to it)."""
    global _held_off
    _held_off += 1
    try:
        yield
    finally:
        _held_off -= 1


@functools.lru_cache(maxsize=None)
def load_library(name: str) -> Optional[ctypes.CDLL]:
    """The compiled ``<name>.c`` of this folder, built into the cache if needed; None (with one
    warning) when it can't be built."""
    source = _SOURCES / f"{name}.c"
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-shared", "-fPIC"]
    key = hashlib.sha256(
        source.read_bytes() + " ".join([compiler, *flags, platform.machine(), platform.platform()]).encode()
    ).hexdigest()[:16]
    target = tieta_home() / "native" / f"{name}-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # build beside the target and rename: concurrent first uses never see half a file
            handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(handle)
            try:
                subprocess.run([compiler, *flags, "-o", partial, str(source), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(partial, target)
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        compiler_said = (getattr(error, "stderr", None) or b"").decode(errors="replace").strip()
        reason = f"{error}: {compiler_said[:200]}" if compiler_said else str(error)
        warnings.warn(f"tieta: could not build its {name} kernel ({reason}); using the slower tensor implementation",
                      RuntimeWarning, stacklevel=2)
        return None

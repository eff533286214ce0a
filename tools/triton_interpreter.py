"""A fix for Triton 3.6's interpreter with numpy >= 2.4, for the test harness and the tools.

The interpreter (``TRITON_INTERPRET=1``) is how the tests and ``tools/sanitize_calls.py`` run
the Triton kernels on a CPU. Triton 3.6's cannot run ``range()`` over a runtime scalar with
numpy >= 2.4 (the lent GPU machine pairs the two); Triton 3.8's can. The fix replaces a
private hook of Triton's interpreter, so it lives here, outside the ``msa_fast`` package
(which assigns nothing on third-party modules, tests/test_layers.py): ``tests/conftest.py``
and the tools that interpret call :func:`fix_interpreter_index` before any launch. Compiled
kernels never see any of this. A user who interprets msa_fast's kernels on Triton 3.6 with
numpy >= 2.4 calls it too (``from tools.triton_interpreter import fix_interpreter_index``).
"""

from __future__ import annotations

import os


def fix_interpreter_index() -> bool:
    """Make ``range(tensor)`` work in Triton's interpreter with numpy >= 2.4; True if patched.

    Under ``TRITON_INTERPRET=1`` every scalar inside a kernel -- a runtime int argument
    such as ``N``, a program id, a reduction's result -- is a one-element 1-d numpy array,
    and ``for n0 in range(0, N, BLOCK_N)`` converts it through the ``__index__`` that the
    interpreter installs on ``tl.tensor`` at each launch. Triton 3.6's is
    ``int(self.handle.data)``, which numpy 2.4 turned into ``TypeError: only 0-dimensional
    arrays can be converted to Python scalars`` (the deprecation of scalar conversion of
    ndim > 0 arrays expired); Triton 3.8's squeezes first. The device image pairs Triton 3.6
    with numpy 2.5, so every kernel looping over a runtime bound (attention, pair mining,
    contrastive) failed there while passing here.

    Chosen over changing the kernels: in 3.6's interpreter *only* a Python int survives
    ``range``, so a kernel-side fix means either constexpr bounds (a GPU recompile for each
    sequence length and each N) or ``while`` loops (which Triton does not software-pipeline,
    losing the overlapped loads of attention and mining). The compiled kernels never see
    this; it is the interpreter's own bug. So: a feature check, not a version check -- a
    probe asks the installed interpreter's ``__index__`` to convert a one-element array,
    and only when that raises is the launch-time patch wrapped to install 3.8's squeezing
    version. A Triton without the private hook is left alone (the tests would then show
    the failure plainly).
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    handle_cls = getattr(interpreter, "TensorHandle", None)
    if original is None or scope_cls is None or handle_cls is None or getattr(original, "_msa_fast", False):
        return False
    scope = scope_cls()
    try:
        original(tl.tensor, scope)
        probe = tl.tensor(handle_cls(np.array([3], dtype=np.int32), tl.int32), tl.int32)
        probe.__index__()
        return False  # this interpreter already converts one-element arrays
    except TypeError:
        pass
    except Exception:  # an interpreter whose internals moved: do not guess
        return False
    finally:
        scope.restore()

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._msa_fast = True
    interpreter._patch_lang_tensor = patched
    return True

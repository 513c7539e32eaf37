"""Running the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1: CPU tests and
benchmarks' --tiny runs)."""
from __future__ import annotations


def fix_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a scalar argument (a 1-element array there) into a loop
    bound with int(array), which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed after
    3.6): take the element explicitly."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter, where inline PTX cannot run: kernels that
    use it take their plain-Triton twin (a constexpr EMULATE) there."""
    import triton

    return bool(triton.knobs.runtime.interpret)

"""Drop-in ``torch.nn`` modules built on :mod:`msa_fast.ops` (SPEC section 3)."""

__all__: list[str] = []

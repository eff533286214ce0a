"""STUB: being written (replace this whole file)."""


def add_layer_norm(*a, **k):
    raise NotImplementedError('add_layer_norm is not written yet')


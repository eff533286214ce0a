"""STUB: being written (replace this whole file)."""


class GatedAttentionPooling:
    def __init__(self, *a, **k):
        raise NotImplementedError('GatedAttentionPooling is not written yet')


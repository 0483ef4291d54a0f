"""advisor package."""


def load(name: str, **kwargs):
    """Load a model the way every command's ``--model`` does: an alias, ``zoo:NAME``, a Hugging Face id or
    folder, a ``.gguf`` file, or a folder advisor wrote with ``quantize --out`` / ``recommend --out``
    (loaded back as the packed model it measured). Keyword arguments: see
    :func:`advisor.models.loading.load` (device, dtype, ...). Returns a ``LoadedModel`` (``.model``,
    ``.tokenizer``, ``.info``)."""
    from advisor.models.loading import load as _load

    return _load(name, **kwargs)

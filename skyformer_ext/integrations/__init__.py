"""Optional integrations with other libraries.

Each submodule imports its library when it is imported itself; ``import skyformer_ext`` imports none of them.

    skyformer_ext.integrations.transformers   Skyformer as a Hugging Face transformers ``attn_implementation``
                                              (needs the ``transformers`` extra)
"""

"""Integrations of PBS attention with model libraries.

`pbs_kernels.integrations.hf` plugs PBS into Hugging Face transformers through its public
`AttentionInterface`. It imports transformers, so it is not imported here: the runtime itself
must not need transformers.
"""

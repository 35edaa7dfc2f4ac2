"""Data pipeline: sources -> clean/dedup (datatrove) -> BPE tokenizer -> token shards -> loader.

Entry points: ``prepare.prepare(cfg)`` / ``moeforge prepare``; ``tokenizer.load_tokenizer``;
``loader.TokenDataset`` and ``loader.TokenLoader``; ``synthetic.make_math_problem`` and
``synthetic.check_answer`` for verifiable rewards. Submodules are imported on use so that
``moeforge.config`` (which imports ``data.config``) stays light.
"""

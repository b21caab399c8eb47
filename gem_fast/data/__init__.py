"""Training data, one module per step from a file to token ids:

* :mod:`~gem_fast.data.files`: rows of JSON Lines, JSON, Parquet files and ``datasets`` folders, each
  with its location (``path:line``) for error messages;
* :mod:`~gem_fast.data.records`: the records training reads (:class:`PreferencePair`,
  :class:`Completion`) and the loaders of gem_fast's own JSONL files;
* :mod:`~gem_fast.data.formats`: the GEM paper's preference datasets' formats converted to
  :class:`PreferencePair` s, train/test splits by prompt;
* :mod:`~gem_fast.data.encoding`: tokenising, response masks (:class:`EncodedBatch`);
* :mod:`~gem_fast.data.synthetic`: the built-in ``arith`` and ``decision`` tasks.

The names most callers use are importable from ``gem_fast.data`` itself.
"""

from gem_fast.data.encoding import (EncodedBatch, TokenizerLike, encode_pairs, encode_prompt_responses, encode_prompts,
                                    join_prompt_and_generation)
from gem_fast.data.records import (Completion, Message, PreferencePair, Prompt, load_completions, load_group_rows,
                                   load_preference_jsonl)

__all__ = ["PreferencePair", "Message", "Prompt", "Completion", "EncodedBatch", "TokenizerLike",
           "load_preference_jsonl", "load_completions", "load_group_rows", "encode_prompt_responses", "encode_pairs",
           "encode_prompts", "join_prompt_and_generation"]

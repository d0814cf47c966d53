"""On-policy rollouts: a model samples responses to prompts (vLLM, or transformers as fallback).

* :mod:`kdcache.rollout.engine`: the sampling engine (tokenized prompts -> completions with
  the sampling policy's log-prob of every sampled token), shared by ``kdcache rollout`` and,
  for the teacher, by ``generate-teacher --mode generate``.
* :mod:`kdcache.rollout.rows`: the on-disk layout of a rollout directory (row schema, file names).
* :mod:`kdcache.rollout.run`: ``kdcache rollout`` (sharded, resumable, several workers).
* :mod:`kdcache.rollout.provenance`: which student and round made a cache's responses, and the
  check that stops training on a mix of rounds.
* :mod:`kdcache.rollout.evaluate`: ``kdcache eval --generate`` (teacher-scored reverse KL of a
  model's own samples, ROUGE-L, lengths).

Nothing heavy is imported here: vLLM and torch load only when an engine is built.
"""

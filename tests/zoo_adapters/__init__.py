"""Per-method adapters of tests/test_zoo_golden.py.

Each module exposes:
- `head_options(settings) -> dict`: the fsar head config (with `name`) for the json's settings;
- `release_outputs(head, episode) -> {"output.<key>": tensor}`: calls the head on the golden
  episode (`tests.zoo_golden_support.GoldenEpisode`) and returns the outputs under the golden
  file's names, including `output.loss` computed with the release's formula from the head's
  logits and aux terms (the test backpropagates it);
- `REQUIRED_OUTPUTS`: output keys that must be compared for every file of the method;
- optional `OFFICIAL_ALIASES = {official key: stored official key}`: entries the release's state
  dict repeats under a second name (one module registered twice), which the golden files store
  once; `to_official` must write them equal to the stored one.
"""

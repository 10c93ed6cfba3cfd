"""EvalSettings: which settings decide the numbers (`measured`) and which only set the speed."""

import json
from dataclasses import asdict, fields

from linearard.evaluation.settings import EvalSettings, measured

SPEED_ONLY = {"batch_size", "max_batch_tokens"}


def test_only_the_batch_sizes_are_speed_only():
    assert {f.name for f in fields(EvalSettings) if f.metadata.get("speed_only")} == SPEED_ONLY


def test_measured_drops_exactly_the_batch_sizes_of_a_dataclass():
    settings = EvalSettings.for_device("cpu", limit=7, batch_size=3, max_batch_tokens=99, samples=2)
    kept = measured(settings)
    assert set(kept) == {f.name for f in fields(EvalSettings)} - SPEED_ONLY
    assert kept == {k: v for k, v in asdict(settings).items() if k not in SPEED_ONLY}
    assert (kept["limit"], kept["samples"], kept["lengths"]) == (7, 2, settings.lengths)
    # settings that differ only in batch sizes measure the same; any other difference shows
    assert measured(EvalSettings(batch_size=1, max_batch_tokens=2)) == measured(EvalSettings())
    assert measured(EvalSettings(samples=6)) != measured(EvalSettings())


def test_measured_reads_a_dict_back_from_json_and_leaves_it_alone():
    settings = EvalSettings.for_device("cpu", ppl_lengths=(64, 128), depths=(0.5,))
    read_back = json.loads(json.dumps(asdict(settings)))  # tuples -> lists, as in a results file
    before = dict(read_back)
    kept = measured(read_back)
    assert read_back == before  # not changed in place
    assert kept == {k: v for k, v in read_back.items() if k not in SPEED_ONLY}
    assert (kept["ppl_lengths"], kept["depths"]) == ([64, 128], [0.5])
    assert kept == json.loads(json.dumps(measured(settings)))  # the same whichever form it came in
    assert measured(kept) == kept  # a fingerprint already without batch sizes: unchanged
    assert measured({}) == {}

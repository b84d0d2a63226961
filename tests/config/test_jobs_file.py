"""Jobs files for `qtool quantize --jobs`: each entry's fields reach the one config the way a config file or the
flags spell them, and every mistake is one line naming the job and the field."""

from __future__ import annotations

import pytest

from qtool.config.jobs_file import read_jobs_file
from qtool.config.schema import QUANTIZE_DEFAULT_PRESET, QUANTIZE_EXL2_PRESET, read_config_file
from qtool.core.errors import QtoolError


def write(tmp_path, text: str, name: str = "jobs.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_fields_shorthands_defaults_and_presets(tmp_path):
    calibration = write(tmp_path, "some text", "calib.txt")
    path = write(tmp_path, f"""
defaults: {{samples: 16, seqlen: 64}}
jobs:
  - {{model: m, output: a, bits: 3, group_size: 64}}
  - {{model: m, output: b, format: exl2, bpw: 3.5, calibration: {calibration}, seed: 7}}
  - model: m
    output: c
    config: gptq-4bit-g128
    calibration: {{source: {calibration}, samples: 8}}
    desc_act: false
compare: {{text: {calibration}, windows: 3}}
""")
    jobs = read_jobs_file(path)
    a, b, c = (job.config for job in jobs.jobs)
    gptq, exl2 = read_config_file(QUANTIZE_DEFAULT_PRESET), read_config_file(QUANTIZE_EXL2_PRESET)
    assert (a.bits, a.group_size, a.calibration.samples, a.calibration.seqlen) == (3, 64, 16, 64)
    assert a.desc_act == gptq.desc_act and a.refine_scales == gptq.refine_scales  # the command's preset underneath
    assert (b.output_format, b.bpw, b.calibration.source, b.calibration.seed, b.calibration.samples) == ("exl2", 3.5, str(calibration), 7, 16)
    assert b.head_bits == exl2.head_bits
    assert (c.calibration.samples, c.calibration.seqlen, c.desc_act) == (8, 64, False)  # the job beats defaults
    assert [(j.index, j.model, j.output) for j in jobs.jobs] == [(0, "m", "a"), (1, "m", "b"), (2, "m", "c")]
    assert (jobs.compare.text, jobs.compare.windows, jobs.compare.seqlen) == (str(calibration), 3, None)


def test_compare_can_be_turned_off_and_json_works(tmp_path):
    path = write(tmp_path, '{"jobs": [{"model": "m", "output": "a", "method": "rtn"}], "compare": false}', "jobs.json")
    jobs = read_jobs_file(path)
    assert jobs.compare is None and jobs.jobs[0].config.method == "rtn"


@pytest.mark.parametrize("text,expected", [
    ("jobs:\n  - {model: m, output: a}\n  - {model: m, output: b, bits: 5}\n", r"jobs\[1\]\.bits: 5 is not valid"),
    ("jobs:\n  - {model: m, output: a, bitz: 4}\n", r"jobs\[0\]: unknown key 'bitz' \(did you mean 'bits'"),
    ("jobs:\n  - {model: m, output: a, group_size: big}\n", r"jobs\[0\]\.group_size must be an integer"),
    ("jobs:\n  - {model: m, output: a, samples: 0}\n", r"jobs\[0\]\.calibration\.samples: 0 is out of range"),
    ("jobs:\n  - {model: m, output: a, format: exl2, bpw: 9}\n", r"jobs\[0\]\.bpw: 9\.0 is out of range"),
    ("jobs:\n  - {model: m}\n", r"jobs\[0\] has no output"),
    ("jobs:\n  - {model: m, output: a}\n  - {model: n, output: ./a}\n", r"jobs\[0\] and jobs\[1\] write the same output"),
    ("jobs: []\n", r"has no `jobs:` list"),
    ("jobs:\n  - {model: m, output: a}\nextra: 1\n", r"unknown key 'extra'"),
    ("jobs:\n  - {model: m, output: a}\ncompare: {text: x, window: 3}\n", r"compare: unknown key 'window'"),
    ("jobs:\n  - {model: m, output: a}\ndefaults: {bits: 7}\n", r"jobs\[0\]\.bits: 7 is not valid"),
    ("jobs: [\n", r"cannot be parsed"),
])
def test_mistakes_are_one_line_naming_job_and_field(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)  # relative outputs
    with pytest.raises(QtoolError, match=expected) as caught:
        read_jobs_file(write(tmp_path, text))
    assert "\n" not in caught.value.one_line()


def test_missing_file(tmp_path):
    with pytest.raises(QtoolError, match="does not exist"):
        read_jobs_file(tmp_path / "nope.yaml")


def test_toml_reads_like_yaml_and_other_suffixes_are_refused(tmp_path):
    yaml_jobs = read_jobs_file(write(tmp_path, "jobs:\n  - {model: m, output: a, bits: 3, samples: 8}\n"))
    toml_jobs = read_jobs_file(write(tmp_path, '[[jobs]]\nmodel = "m"\noutput = "a"\nbits = 3\nsamples = 8\n', "jobs.toml"))
    assert toml_jobs.jobs[0].config == yaml_jobs.jobs[0].config
    with pytest.raises(QtoolError, match=r"jobs\.txt has an unknown type '\.txt'") as caught:
        read_jobs_file(write(tmp_path, "jobs:\n  - {model: m, output: a}\n", "jobs.txt"))
    assert ".yaml, .json or .toml" in caught.value.one_line()

"""``carclf ensemble-config``: the config it writes loads, says what was asked and is served; what it refuses
names the problem and writes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from carclf.cli import main
from carclf.clients import connect
from carclf.ensemble.config import load_config, parse_config
from carclf.ensemble.members import SavedModelMemberCaller
from carclf.ensemble.runtime import EnsembleRuntime
from tests.ensemble.servers import embedded_server, grpc_url


def test_a_written_config_says_what_was_asked_and_is_served_as_its_own_model(tiny_repository_template, photos,
                                                                             tmp_path, capsys):
    repo = tiny_repository_template
    path = tmp_path / "ensembles" / "mine" / "config.pbtxt"
    assert main(["ensemble-config", "tiny_a:1", "tiny_b", "--name", "mine", "--tta", "hflip",
                 "--param", "aggregation=weighted_mean", "--param", "weight.tiny_a=3",
                 "--param", "failure_policy=degrade", "--repository", str(repo), "--out", str(path)]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"wrote {path}: mine over tiny_a, tiny_b"

    config = load_config(path)
    assert config.name == "mine" and config.tta.name == "hflip" and config.aggregation == "weighted_mean"
    assert [(m.name, m.version, m.weight) for m in config.members] == [("tiny_a", 1, 3.0), ("tiny_b", None, 1.0)]
    assert config.failure_policy == "degrade"

    images = [p.read_bytes() for p in photos[:3]]
    with EnsembleRuntime(config, SavedModelMemberCaller(repo)) as runtime:
        runtime.prepare()
        want = runtime.predict(images)
    with embedded_server(repo, tmp_path / "server", ensembles=[path]) as server, \
            connect(grpc_url(server)) as client:
        got = client.predict("mine", images=images)
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
    assert got.outputs["member_versions"].tolist() == [[1, 1]] * 3  # tiny_a pinned to 1 although 2 is newer


def test_without_out_the_config_goes_to_standard_output(capsys):
    assert main(["ensemble-config", "tiny_a", "tiny_b:2"]) == 0
    config = parse_config(capsys.readouterr().out)
    assert config.name == "car_ensemble" and [(m.name, m.version) for m in config.members] == [
        ("tiny_a", None), ("tiny_b", 2)]


@pytest.mark.parametrize("args,needle", [
    (["tiny_a", "tiny_a"], "member 'tiny_a' is named twice"),
    (["tiny_a:0"], "member 'tiny_a:0': expected NAME or NAME:VERSION with a version >= 1"),
    (["tiny_a:x"], "member 'tiny_a:x': expected NAME or NAME:VERSION"),
    (["tiny_a:\u00b2"], "member 'tiny_a:\u00b2': expected NAME or NAME:VERSION"),  # a digit int() cannot read
    (["tiny_a:"], "member 'tiny_a:': expected NAME or NAME:VERSION"),
    ([":2"], "member ':2': expected NAME or NAME:VERSION"),
    (["tiny_a", "--name", "my ensemble"], "field 'name': received 'my ensemble'"),
    (["bad name"], "field 'ensemble_scheduling.step[1].model_name': received 'bad name'"),
    (["tiny_a", "--param", "weight.tiny_c=2"], "field 'parameters['weight.tiny_c']': no member named 'tiny_c'"),
    (["tiny_a", "--param", "aggregation=median"], "field 'parameters['aggregation']': expected one of"),
    (["tiny_a", "--param", "quorum"], "--param: received 'quorum'; expected KEY=VALUE"),
    (["tiny_a", "--param", "colour=red"], "field 'parameters['colour']': unknown parameter"),
    (["tiny_a", "--tta", "bogus"], "unknown TTA policy 'bogus'"),
    (["tiny_a", "--tta", "hflip", "--param", "tta_policy=none"], "'tta_policy' is given twice (--tta sets"),
    (["tiny_a", "tiny_c", "--repository", "{repo}"], "member 'tiny_c': no version folder under"),
    (["tiny_a:7", "--repository", "{repo}"], "member 'tiny_a': no version 7 under"),
    (["tiny_a", "--repository", "{repo}/tiny_a"], "('{repo}/tiny_a' is itself a model, of versions [1, 2]: the model "
                                                  "repository is the folder that holds the members, here '{repo}')"),
])
def test_a_refused_config_names_the_problem_and_leaves_the_old_file(tiny_repository_template, tmp_path, capsys,
                                                                    args, needle):
    out = tmp_path / "config.pbtxt"
    out.write_text("the config in use\n")
    argv = ["ensemble-config", *(a.replace("{repo}", str(tiny_repository_template)) for a in args), "--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals would land here
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("carclf")]
    needle = needle.replace("{repo}", str(tiny_repository_template))
    assert len(lines) == 1 and lines[0].startswith("carclf ensemble-config: error: ") and needle in lines[0], err
    assert out.read_text() == "the config in use\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.pbtxt"]

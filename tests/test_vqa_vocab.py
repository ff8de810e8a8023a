"""Answer vocabularies (vlseg.vqa.AnswerVocab): normalisation, aliases, unknown-answer policies, JSON round trips,
the packaged lists in their published order."""

from __future__ import annotations

import json

import pytest

from vlseg.vqa import AnswerVocab, UnknownAnswerError, list_vocabularies, normalize_answer


def test_packaged_vocabularies_keep_published_order():
    assert set(list_vocabularies()) >= {"endovis18-vqa", "cholec80-vqa", "psi-ava-vqa", "ssg-vqa", "engine"}
    sizes = {n: len(AnswerVocab.load(n).answers) for n in ("endovis18-vqa", "cholec80-vqa", "psi-ava-vqa", "ssg-vqa")}
    assert sizes == {"endovis18-vqa": 18, "cholec80-vqa": 13, "psi-ava-vqa": 35, "ssg-vqa": 51}
    ev = AnswerVocab.load("endovis18-vqa")
    assert ev.index("Ultrasound_Sensing") == 13 and ev.index("right-bottom") == 17 and ev.answer(0) == "kidney"
    assert AnswerVocab.load("ssg-vqa").index("True") == 12 and AnswerVocab.load("cholec80-vqa").index("3") == 12
    for name in list_vocabularies():
        v = AnswerVocab.load(name)
        assert v.name == name and v.version and v.source and v.unknown_policy == "error"


@pytest.mark.parametrize("spelling", ["Tissue_Manipulation", "tissue manipulation", "Tissue Manipulation",
                                      "  TISSUE-manipulation ", "tissue__manipulation"])
def test_spellings_map_to_one_answer(spelling):
    ev = AnswerVocab.load("endovis18-vqa")
    assert ev.normalize(spelling) == "tissue manipulation" and ev.index(spelling) == 4 and spelling in ev


def test_aliases():
    cholec = AnswerVocab.load("cholec80-vqa")
    assert cholec.index("CalotTriangleDissection") == cholec.index("calot triangle dissection") == 1
    assert AnswerVocab.load("endovis18-vqa").index("top left") == 14
    with pytest.raises(ValueError, match="alias 'x' points to 'nope'"):
        AnswerVocab("v", ("a",), aliases={"x": "nope"})


def test_unknown_policies():
    base = AnswerVocab("toy", ("yes", "no"))
    with pytest.raises(UnknownAnswerError, match=r"answer 'Maybe'.*not in vocabulary 'toy'"):
        base.index("Maybe")
    unk = base.with_policy("unknown")
    assert unk.index("maybe") == 2 == unk.unk_index and len(unk) == 3 and unk.answer(2) == "<unk>"
    skip = base.with_policy("skip")
    assert skip.resolve("maybe") is None and skip.resolve("YES") == 0 and len(skip) == 2 and skip.unk_index is None
    with pytest.raises(UnknownAnswerError, match="policy 'skip'"):
        skip.index("maybe")
    with pytest.raises(ValueError, match="unknown_policy must be one of"):
        AnswerVocab("toy", ("a",), unknown_policy="drop")  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="out of range"):
        base.answer(2)


def test_from_answers_and_json_round_trip(tmp_path):
    v = AnswerVocab.from_answers(["Yes", "no", "yes", "2", "no", "yes", "rare"], name="train", min_count=2)
    assert v.answers == ("yes", "no") and v.unknown_policy == "unknown" and v.index("rare") == 2
    path = tmp_path / "v.json"
    v.to_json(path)
    again = AnswerVocab.from_json(path)
    assert again == v and AnswerVocab.from_json(json.loads(path.read_text())) == v
    ev = AnswerVocab.load("endovis18-vqa")
    assert AnswerVocab.from_json(ev.to_json()) == ev
    extended = AnswerVocab.load("engine").with_answers(["Liver", "yes"])
    assert extended.answers[-1] == "liver" and len(extended.answers) == len(AnswerVocab.load("engine").answers) + 1


def test_bad_vocabularies_are_named(tmp_path):
    with pytest.raises(ValueError, match="'Tissue_Manipulation' and 'tissue manipulation' normalise to the same"):
        AnswerVocab("dup", ("Tissue_Manipulation", "tissue manipulation"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "answers": ["a"], "labels": []}')
    with pytest.raises(ValueError, match=r"bad.json: unknown vocabulary keys \['labels'\]"):
        AnswerVocab.from_json(bad)
    bad.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match=r"bad.json: vocabulary is missing \['answers'\]"):
        AnswerVocab.from_json(bad)
    with pytest.raises(KeyError, match="Unknown answer vocabulary 'endovis18'.*Did you mean"):
        AnswerVocab.load("endovis18")
    with pytest.raises(ValueError, match="reserved"):
        AnswerVocab("x", ("<UNK>",))
    assert normalize_answer(" Vesículas_Seminales ") == "vesículas seminales"

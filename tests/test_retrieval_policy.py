"""The prompt policy of the retrieval index (issue 18, item 2): neighbours from the query's own system, never
below the similarity floor, word+char features, contrastive picks; stored in the index so every reader applies
the same one, and old pickled indexes keep their old behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common.retrieval import TemplateIndex

BGL = [("data TLB error interrupt", 1), ("instruction cache parity error corrected", 0),
       ("ciod: failed to read message prefix on control stream", 1), ("generating core for process", 0)]
SPIRIT = [("data TLB error interrupt on node", 0), ("kernel: mptscsih: ioc0: attempting task abort", 1),
          ("sshd: session opened for user root", 0)]


def build(**policy) -> TemplateIndex:
    templates = [t for t, _ in BGL + SPIRIT]
    labels = [y for _, y in BGL + SPIRIT]
    datasets = ["bgl"] * len(BGL) + ["spirit"] * len(SPIRIT)
    return TemplateIndex(templates, labels, datasets, policy.pop("features", "word+char"), **policy)


def datasets_shown(index: TemplateIndex, query: str, dataset: str | None, k: int | None = None) -> list[str]:
    return [n.dataset for n in index.shown([query], [dataset], k)[0]]


def test_neighbours_come_from_the_querys_own_system_compared_case_insensitively():
    index = build(k=3, floor=0.05, same_system=True)
    # the Spirit twin "data TLB error interrupt on node" is more similar than most BGL templates, yet never shown
    assert set(datasets_shown(index, "data TLB error interrupt on node 12", "BGL")) == {"bgl"}
    assert set(datasets_shown(index, "data TLB error interrupt on node 12", "Spirit")) == {"spirit"}
    pairs = index.prompt_neighbours(["data TLB error interrupt on node 12"], ["BGL"])
    assert pairs[0] and all(t in dict(BGL) for t, _ in pairs[0])


def test_a_system_the_index_does_not_hold_searches_all_systems():
    index = build(k=4, floor=0.01, same_system=True)
    shown = datasets_shown(index, "data TLB error interrupt on node 12", "thunderbird")
    assert {"bgl", "spirit"} <= set(shown)
    assert set(datasets_shown(index, "data TLB error interrupt on node 12", None)) == set(shown)


def test_no_neighbour_below_the_floor_and_a_hex_only_query_gets_none():
    index = build(k=3, floor=0.1, same_system=True)
    assert index.prompt_neighbours(["0x00ff12ab 0x00001234 48"], ["bgl"]) == [[]]
    for near in index.shown(["data TLB error", "sshd: session closed", "parity"], ["bgl", "spirit", "bgl"]):
        assert all(n.similarity >= 0.1 for n in near)
    # a prompt shows fewer than k when only some neighbours clear the floor
    few = index.shown(["ciod: failed to read message prefix"], ["bgl"])[0]
    assert 1 <= len(few) < 3


def test_contrastive_shows_the_nearest_of_each_label_then_fills_by_similarity():
    templates = ["disk error on sda", "disk error on sdb", "disk error on sdc", "disk failure fatal on sdd"]
    labels = [0, 0, 0, 1]
    plain = TemplateIndex(templates, labels, ["bgl"] * 4, "word", k=2, floor=0.01)
    both = TemplateIndex(templates, labels, ["bgl"] * 4, "word", k=2, floor=0.01, contrastive=True)
    assert [y for _, y in plain.prompt_neighbours(["disk error on sde"], ["bgl"])[0]] == [0, 0]
    shown = both.shown(["disk error on sde"], ["bgl"])[0]
    assert sorted(n.label for n in shown) == [0, 1]
    assert shown[0].similarity >= shown[1].similarity  # still most similar first
    assert len(both.prompt_neighbours(["disk error on sde"], ["bgl"], k=3)[0]) == 3  # filled to k by similarity
    # only one label above the floor: the rest filled from it
    normals = TemplateIndex(templates[:3], labels[:3], ["bgl"] * 3, "word", k=2, floor=0.01, contrastive=True)
    assert [y for _, y in normals.prompt_neighbours(["disk error on sde"], ["bgl"])[0]] == [0, 0]


def test_an_index_pickled_before_the_policy_behaves_as_before(tmp_path: Path):
    index = build(features="word", k=2, floor=0.5, same_system=True, contrastive=True)
    for name in ("k", "floor", "same_system", "contrastive"):  # what an old registered version's pickle lacks
        delattr(index, name)
    index.save(tmp_path / "old.pkl")
    old = TemplateIndex.load(tmp_path / "old.pkl")
    assert old.policy() == {"k": 3, "floor": None, "same_system": False, "contrastive": False, "features": "word"}
    # the 3 nearest over all systems whatever their similarity, as search() always gave them
    hex_only = old.shown(["0x00ff12ab"], ["bgl"])[0]
    assert len(hex_only) == 3 and all(n.similarity == pytest.approx(0.0) for n in hex_only)
    query = "data TLB error interrupt on node 12"
    assert old.prompt_neighbours([query]) == [[(n.template, n.label) for n in old.search([query], 3)[0]]]


def test_the_policy_round_trips_through_save_and_load(tmp_path: Path):
    index = build(k=2, floor=0.15, same_system=True, contrastive=True)
    index.save(tmp_path / "index.pkl")
    loaded = TemplateIndex.load(tmp_path / "index.pkl")
    assert loaded.policy() == {"k": 2, "floor": 0.15, "same_system": True, "contrastive": True,
                               "features": "word+char"}
    queries, systems = ["data TLB error interrupt on node 12", "sshd: session opened"], ["bgl", "spirit"]
    assert loaded.prompt_neighbours(queries, systems) == index.prompt_neighbours(queries, systems)
    assert all(len(near) <= 2 for near in loaded.prompt_neighbours(queries, systems))


def test_the_index_stage_stores_the_params_policy(tmp_path: Path):
    import pandas as pd

    from tasks import index as index_stage
    from tasks.common.config import repo_root
    from tasks.common.retrieval import INDEX_FILE
    from tasks.common.settings import load_settings

    train = tmp_path / "train.parquet"
    pd.DataFrame({"dataset": ["bgl"] * len(BGL) + ["spirit"] * len(SPIRIT), "template": [t for t, _ in BGL + SPIRIT],
                  "label": [y for _, y in BGL + SPIRIT]}).to_parquet(train)
    settings = load_settings(repo_root() / "params.yaml").index.model_copy(
        update={"train_file": str(train), "out_dir": str(tmp_path / "index"), "floor": 0.2, "k": 2})
    meta = index_stage.run(settings)
    stored = TemplateIndex.load(tmp_path / "index" / INDEX_FILE).policy()
    assert stored == meta["policy"] == {"k": 2, "floor": 0.2, "same_system": settings.same_system,
                                        "contrastive": settings.contrastive, "features": settings.features}


def test_word_char_features_match_fragments_words_miss():
    index = build(features="word+char", k=1, floor=0.05)
    assert index.prompt_neighbours(["mptscsih ioc0 task abort"], ["spirit"])[0][0][1] == 1
    with pytest.raises(ValueError, match="unknown index features"):
        build(features="bpe")


def test_retrieval_quality_counts_what_prompts_show():
    from tasks.evaluation.retrieval_quality import quality_table, retrieval_quality

    items = [("data TLB error interrupt on node 12", "bgl", 1), ("0x00ff12ab", "bgl", 0),
             ("sshd: session opened for user admin", "spirit", 0)]
    old = build(features="word")
    del old.k, old.floor, old.same_system, old.contrastive
    before = retrieval_quality(old, items)
    assert before["bgl"]["shown_any"] == 1.0 and before["bgl"]["mean_shown"] == 3
    assert before["bgl"]["other_system"] > 0 and before["bgl"]["below_floor"] == 0  # no floor to be below
    after = retrieval_quality(build(k=3, floor=0.1, same_system=True, contrastive=True), items)
    assert after["bgl"]["shown_any"] == 0.5 and after["bgl"]["other_system"] == 0.0
    assert after["bgl"]["below_floor"] == 0.0 and after["bgl"]["recall_at_k"] == 0.5
    assert after["bgl"]["recall_at_k_abnormal"] == 1.0 and after["spirit"]["recall_at_k"] == 1.0
    assert len(quality_table(after)) == 4

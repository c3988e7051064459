"""Each script holds every detail of its algorithm, so the algorithm definitions two scripts share are copies: every
top-level definition that two scripts both have must be byte-identical, except the ones listed in PURPOSELY_DIFFERENT
(each script's own flags, metrics and loop, and the UPQ change between off2on_finetune.py and upq_finetune.py). Run
plumbing lives once, in plumbing.py: no script defines a name of it again."""

import ast
from collections import defaultdict

import pytest

from conftest import REPO, SCRIPTS

CQL, OFF2ON, UPQ, DATASET = SCRIPTS
# name -> the groups of scripts whose definitions may differ from each other (within a group they must not)
PURPOSELY_DIFFERENT = {
    "Algorithm": [{CQL}, {OFF2ON}, {UPQ}],  # each method's hyperparameters
    "Run": [{CQL}, {OFF2ON}, {UPQ}],  # each script's default run name
    "FLAG_RANGES_OF": [{CQL}, {OFF2ON}, {UPQ}],
    "METRICS": [{CQL}, {OFF2ON}, {UPQ}],
    "main": [{CQL}, {OFF2ON, UPQ}, {DATASET}],  # fine-tuning: one loop for both methods
    "start_run": [{CQL}, {OFF2ON, UPQ}],  # ... set up in one call
    "evaluate": [{CQL}, {OFF2ON, UPQ}, {DATASET}],  # CQL: every agent and pi^E; fine-tuning: pi^E; SAC's own
    "ALGORITHM": [{OFF2ON}, {UPQ}],
    "finetune_losses": [{OFF2ON}, {UPQ}],  # the UPQ change: Eqs. (4)-(5)
    "loss_hyperparameters": [{OFF2ON}, {UPQ}],  # ... its beta
    "run_name": [{OFF2ON}, {UPQ}],  # ... in the default folders' names
    "epoch_line": [{OFF2ON}, {UPQ}],  # ... and its log column U
    "tanh_gaussian_log_prob": [{CQL}, {OFF2ON, UPQ}],  # the official CQL code's epsilon form, Off2OnRL's exact form
    "Actor": [{CQL, OFF2ON, UPQ}, {DATASET}],  # make_dataset.py's SAC behaviour agent (CleanRL)
    "Args": [{CQL, OFF2ON, UPQ}, {DATASET}],
}


def top_level_definitions(source: str) -> dict[str, str]:
    """Name -> source text of every top-level function, class and assigned constant."""
    definitions = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            targets = [t for target in node.targets
                       for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        for name in names:
            definitions[name] = ast.get_source_segment(source, node)
    return definitions


def drifted(sources: dict[str, str]) -> dict[str, list[set[str]]]:
    """Names whose copies differ beyond what PURPOSELY_DIFFERENT allows: name -> the groups of identical copies."""
    copies = defaultdict(dict)
    for script, source in sources.items():
        for name, text in top_level_definitions(source).items():
            copies[name][script] = text
    found = {}
    for name, by_script in copies.items():
        groups = defaultdict(set)
        for script, text in by_script.items():
            groups[text].add(script)
        allowed = [group & set(by_script) for group in PURPOSELY_DIFFERENT.get(name, [set(by_script)])]
        if sorted(map(sorted, groups.values())) != sorted(map(sorted, filter(None, allowed))):
            found[name] = list(groups.values())
    return found


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {script: (REPO / script).read_text() for script in SCRIPTS}


def test_every_shared_definition_is_the_same_in_every_script(sources):
    assert drifted(sources) == {}
    assert {"twin_min", "ensemble_policy", "Actor", "Critic", "normalized_score"} <= \
        set(top_level_definitions(sources[CQL])) & set(top_level_definitions(sources[UPQ]))


def test_run_plumbing_lives_once_in_its_module(sources):
    plumbing = set(top_level_definitions((REPO / "plumbing.py").read_text()))
    assert {"fail", "check_flags", "save_checkpoint", "load_checkpoint", "prepare_folders", "load_offline_data",
            "cuda_graphed", "progress"} <= plumbing
    for script, source in sources.items():
        assert "\nfrom plumbing import" in source, script
        assert plumbing & set(top_level_definitions(source)) == set(), script


@pytest.mark.parametrize("script, name", [(CQL, "vectorized_mlp"), (OFF2ON, "BalancedReplay"), (UPQ, "twin_min"),
                                          (CQL, "normalized_score"), (UPQ, "ensemble_policy")])
def test_a_one_character_change_to_one_copy_is_caught(sources, script, name):
    text = top_level_definitions(sources[script])[name]
    changed = {**sources, script: sources[script].replace(text, text.replace("(", "( ", 1), 1)}
    assert name in drifted(changed)


def test_an_allowed_difference_must_stay_within_its_groups(sources):
    """off2on and upq must keep one main: a change to one of them is drift, though main differs from cql's."""
    text = top_level_definitions(sources[OFF2ON])["main"]
    changed = {**sources, OFF2ON: sources[OFF2ON].replace(text, text.replace("(", "( ", 1), 1)}
    assert "main" in drifted(changed)

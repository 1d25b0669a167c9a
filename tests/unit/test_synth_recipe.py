"""`gazal synth` refuses bad input in one line before any generation (recipe, model, endpoint, key,
output folder, a folder holding another run), and `--dry-run` prints the plan."""

import json
import socket
from pathlib import Path

import pytest

from gazal_nemo.cli import main
from gazal_nemo.synth.config import load_synth_recipe

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "recipes" / "synth_structured_medical.yaml"
TINY = ROOT / "recipes" / "tiny_cpu_synth.yaml"


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """Config and tokenizer (with a chat template) of the tiny Qwen3: all a dry run reads."""
    from gazal_nemo.testing.tiny import make_tiny_tokenizer, tiny_qwen3_config

    folder = tmp_path_factory.mktemp("chat_model")
    tokenizer = make_tiny_tokenizer(folder)
    tiny_qwen3_config(len(tokenizer), head_dim=32, max_position_embeddings=2048).save_pretrained(folder)
    return folder


def _gazal(capsys, *argv):
    code = main(["synth", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_recipes_load():
    paper = load_synth_recipe(PAPER)
    assert paper.num_chunks == -(-107_033 // 256)
    tiny = load_synth_recipe(TINY, ["generator.model=x"])
    assert tiny.validation.enforce is False and tiny.design == paper.design


@pytest.mark.parametrize("override, message", [
    ("design.modules.diagnostic.weight=0.3", "unknown module key 'diagnostic' in design.modules"),
    ("design.modules.diagnostic_reasoning.factors.rare.rate=0.5",
     "unknown factor key 'rare' in design.modules.diagnostic_reasoning.factors"),
    ("design.factors.comorbidity.rate=0.5", "unknown factor key 'comorbidity' in design.factors"),
    ("design.categorical.complexity.weights.extreme=0.1", "unknown category value key 'extreme'"),
    ("design.modules.diagnostic_reasoning.factors.rare_condition.rate=1.5",
     "design.modules.diagnostic_reasoning.factors.rare_condition.rate=1.5; allowed: a rate in [0, 1]"),
    ("design.factors.comorbidities.rate=-0.1", "design.factors.comorbidities.rate=-0.1; allowed: a rate in [0, 1]"),
    ("design.categorical.complexity.weights.high=0.8", "design.categorical.complexity.weights: weights sum to 1.1"),
    ("design.modules.treatment_planning.weight=0.3", "design.modules.*.weight: weights sum to 1.05"),
    ("prompts.case_user=Write a case about {organ}.", "prompts.case_user: unknown placeholder {organ}"),
    ("generator.backend=tgi", "generator.backend: 'tgi' is not allowed"),
    ("generator.bogus=1", "unknown key generator.bogus"),
    ("validation.min_steps=0", "validation.min_steps and validation.max_words_per_step must be >= 1"),
    ("generator.case_sampling.top_p=0", "generator.case_sampling.top_p=0.0; allowed: 0 < top_p <= 1"),
    ("generator.vllm.cpu_kv_cache_gib=0.5", "generator.vllm.cpu_kv_cache_gib: expected an integer"),
])
def test_recipe_mistakes_name_the_key(override, message):
    with pytest.raises(ValueError) as error:
        load_synth_recipe(PAPER, [override])
    assert message in str(error.value)


def test_an_added_module_or_category_is_data(tmp_path):
    text = PAPER.read_text().replace("    diagnostic_reasoning:\n      weight: 0.25", "    diagnostic_reasoning:\n      weight: 0.20")
    text = text.replace("  categorical:", """    pediatric_cardiology:
      weight: 0.05
      title: pediatric cardiology reasoning
      goal: recognise congenital heart disease in infants
      reasoning_pattern: [Murmur characterisation, Oxygen saturation gradient, Echo findings, Diagnosis]
      factors:
        cyanosis: {rate: 0.5, instruction: The infant is cyanotic.}
  categorical:
    specialty:
      weights: {cardiology: 0.5, nephrology: 0.5}""")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe = load_synth_recipe(path, ["design.modules.pediatric_cardiology.factors.cyanosis.rate=0.4"])
    assert recipe.design.modules["pediatric_cardiology"].factors["cyanosis"].rate == 0.4
    from gazal_nemo.synth.attributes import draw_attributes
    from gazal_nemo.synth.prompts import case_messages

    modules = {draw_attributes(recipe.design, 0, i).module for i in range(400)}
    assert "pediatric_cardiology" in modules
    index = next(i for i in range(400) if draw_attributes(recipe.design, 0, i).module == "pediatric_cardiology")
    attrs = draw_attributes(recipe.design, 0, index)
    assert "pediatric cardiology reasoning" in case_messages(recipe, attrs)[1]["content"]
    assert attrs.categorical["specialty"] in ("cardiology", "nephrology")


def test_a_stage_recipe_is_sent_to_its_command(capsys):
    code, _, err = _gazal(capsys, "--recipe", ROOT / "recipes" / "tiny_cpu_sft.yaml", "--dry-run")
    assert code == 2 and "stage is 'sft'; run it with `gazal sft`" in err and len(err.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_input_mistakes_are_one_line_before_generation(capsys, tmp_path, chat_model_dir, monkeypatch):
    common = ["--recipe", TINY, f"output_dir={tmp_path / 'out'}", "--dry-run"]
    no_template = tmp_path / "no_template"
    no_template.mkdir()
    for item in chat_model_dir.iterdir():
        if item.name != "chat_template.jinja":
            (no_template / item.name).write_bytes(item.read_bytes())
    cases = [
        ([f"generator.model={no_template}", "generator.backend=hf"], "has no chat template"),
        ([f"generator.model={tmp_path / 'missing'}", "generator.backend=hf"], "no such folder"),
        (["generator.backend=openai", "generator.model=tiny",
          f"generator.openai.base_url=http://127.0.0.1:{_free_port()}/v1"], "unreachable"),
        (["generator.backend=openai", "generator.model=tiny", "generator.openai.api_key_env=GAZAL_TEST_NO_SUCH_KEY"],
         "GAZAL_TEST_NO_SUCH_KEY': that environment variable is not set"),
        ([f"generator.model={chat_model_dir}", "generator.backend=hf",
          "decontam.benchmarks=[{name: medqa, path: /nonexistent/medqa.jsonl}]"],
         "decontam.benchmarks[0].path: data source path /nonexistent/medqa.jsonl does not exist"),
    ]
    monkeypatch.delenv("GAZAL_TEST_NO_SUCH_KEY", raising=False)
    for overrides, message in cases:
        code, out, err = _gazal(capsys, *common, *overrides)
        assert code == 2 and message in err, (overrides, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "a_file").write_text("x")
    code, _, err = _gazal(capsys, "--recipe", TINY, f"output_dir={tmp_path / 'a_file'}", "--dry-run",
                          f"generator.model={chat_model_dir}", "generator.backend=hf")
    assert code == 2 and "output_dir=" in err and "is a file" in err


def test_dry_run_prints_the_plan_and_refuses_a_changed_run(capsys, tmp_path, chat_model_dir):
    from gazal_nemo.synth.chunks import write_identity

    args = ["--recipe", TINY, f"output_dir={tmp_path}", f"generator.model={chat_model_dir}", "generator.backend=hf"]
    code, out, err = _gazal(capsys, *args, "--dry-run")
    assert code == 0, err
    assert "12 examples in 3 chunks of 4" in out and "generations expected: 24" in out
    assert "at most 72 if every attempt were rejected" in out
    assert "complexity=high" in out and "diagnostic_reasoning/rare_condition" in out and "dry run OK" in out
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"
    write_identity(tmp_path, load_synth_recipe(TINY, args[3:5] + ["seed=1"]))
    code, _, err = _gazal(capsys, *args, "--dry-run")
    assert code == 2 and "holds a run made with other settings: seed (1 -> 3407)" in err
    # settings that do not change what is generated may change between runs of one folder
    write_identity(tmp_path, load_synth_recipe(TINY, args[3:5] + ["dedup.enabled=false", "generator.openai.max_retries=1"]))
    assert _gazal(capsys, *args, "--dry-run")[0] == 0
    assert json.loads((tmp_path / "run.json").read_text())["num_chunks"] == 3


def test_finalize_before_generation_says_what_is_missing(capsys, tmp_path, chat_model_dir):
    code, _, err = _gazal(capsys, "--recipe", TINY, f"output_dir={tmp_path}", f"generator.model={chat_model_dir}",
                          "--finalize")
    assert code == 2 and "3 of 3 chunks are not generated yet (first: chunk-000000.jsonl)" in err

"""Bad configuration through the CLI: exit non-zero with one actionable line, never a library traceback.

Each case runs train.py (or evaluate.py) in a subprocess on the demo config with one mistake in it.
"""

import pytest
from conftest import FAST_DEMO

pytestmark = pytest.mark.slow

S2 = [*FAST_DEMO, "variant=s2", "test=false"]


def assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


def test_unknown_task_name(run_cli):
    proc = run_cli("train.py", *FAST_DEMO, "variant=s2", "data.select=[sos_hl_1k,cognitive_paths]", check=False)
    assert_one_line_error(proc, "unknown task 'cognitive_paths' in data.select", "known tasks: ", "sos_hl_1k")


def test_task_without_data_files(run_cli):
    proc = run_cli("train.py", *S2, "data.tasks.cp.train=null", check=False)
    assert_one_line_error(proc, "task 'cp'", "no data files in data=fixtures", "data.tasks.cp")


def test_unknown_model_name(run_cli):
    proc = run_cli("train.py", *S2, "model=glm5", check=False)
    assert_one_line_error(proc, "unknown model 'glm5'", "glm4, glm4_chat,", "tiny_glm", "conf/model/NAME.yaml")


def test_unknown_variant_name_in_a_sweep_list(run_cli):
    proc = run_cli("train.py", *FAST_DEMO, "variant=s1,s3", check=False)
    assert_one_line_error(proc, "unknown variant 's3'", "full, s1, s2")


def test_missing_local_model_path(run_cli, tmp_path):
    proc = run_cli("train.py", *S2, "model=glm4", f"model.pretrained={tmp_path}/glm-4-9b", "trainer=cpu", check=False)
    assert_one_line_error(proc, f"model.pretrained={tmp_path}/glm-4-9b is not a model directory")


def test_unknown_hub_model_id(run_cli):
    proc = run_cli(
        "train.py",
        *S2,
        "model=glm4",
        "model.pretrained=no-such-org/no-such-model",
        "trainer=cpu",
        check=False,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert_one_line_error(proc, "cannot load model.pretrained=no-such-org/no-such-model", "Hugging Face id")


def test_missing_data_file(run_cli, tmp_path):
    missing = tmp_path / "cp" / "train.txt"
    proc = run_cli("train.py", *S2, f"data.tasks.cp.train={missing}", check=False)
    assert_one_line_error(proc, f"data file not found: {missing} (data.tasks.cp.train)", "paths.data_dir")


def test_init_adapter_that_is_not_an_adapter(run_cli, tmp_path):
    proc = run_cli(
        "train.py", *FAST_DEMO, "~variant", "stage=two", f"stages.two.init={tmp_path}", "test=false", check=False
    )
    assert_one_line_error(proc, f"stages.two.init={tmp_path} is not a LoRA adapter directory")
    # (stage two with no stage-one adapter at all: test_e2e_train.py::test_stage_two_without_stage_one_is_a_clear_error)


def test_fp16_precision_on_cpu(run_cli):
    # Lightning itself would silently train in bf16 instead.
    proc = run_cli("train.py", *S2, "trainer.precision=16-mixed", check=False)
    assert_one_line_error(proc, "trainer.precision=16-mixed (fp16) needs a CUDA GPU", "32-true")


def test_unknown_precision(run_cli):
    proc = run_cli("train.py", *S2, "trainer.precision=8-bit", check=False)
    assert_one_line_error(proc, "trainer.precision=8-bit is not a precision Lightning knows", "bf16-mixed")


def test_gpu_accelerator_without_gpu(run_cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = run_cli("train.py", *S2, "trainer.accelerator=gpu", check=False)
    assert_one_line_error(proc, "trainer.accelerator=gpu but no CUDA GPU is visible", "trainer=cpu")


def test_lora_target_matching_no_module(run_cli):
    proc = run_cli("train.py", *S2, "lora.target_modules=[q_proj,query_key_value]", check=False)
    assert_one_line_error(proc, "lora.target_modules ['query_key_value'] match no linear module", "q_proj", "down_proj")


def test_evaluate_unknown_task_name(run_cli):
    proc = run_cli(
        "evaluate.py", "model=tiny_glm", "data=fixtures", "trainer=cpu", "data.select=[sos_hl_1k,sos]", check=False
    )
    assert_one_line_error(proc, "unknown task 'sos' in data.select")


def test_evaluate_unknown_parser_mode(run_cli, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"task": "sos_hl_1k", "id": "1", "labels": ["低自杀风险"], "output": "低自杀风险"}\n')
    proc = run_cli("evaluate.py", f"predictions={preds}", "parser_mode=loose", check=False)
    assert_one_line_error(proc, "parser_mode='loose' is not one of strict, free")

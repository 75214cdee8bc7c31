"""train_evo2 end to end on CPU: mock and real data, TP=2/CP=2, kill -9 + resume, fine-tune, resharding, W&B."""

import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from evo2_recipe.checkpoint.dcp_utils import tensor_keys

from cli_helpers import run_cli
from train_helpers import TINY, losses, run_train, train_cmd, val_losses

ROOT = Path(__file__).resolve().parents[1]


def test_mock_single_process_and_context_parallel_match(tmp_path):
    one = run_train([*TINY, "--max-steps", "3", "--eval-interval", "3", "--result-dir", str(tmp_path / "a"),
                     "--disable-tensorboard-logger"])
    cp2 = run_train([*TINY, "--max-steps", "3", "--eval-interval", "3", "--result-dir", str(tmp_path / "b"),
                     "--context-parallel-size", "2", "--disable-tensorboard-logger"], nproc=2)
    l1, l2 = losses(one.stdout), losses(cp2.stdout)
    assert sorted(l1) == [1, 2, 3] and l1.keys() == l2.keys()
    for step in l1:  # CP splits the sequence only: same weights, same data, same loss
        assert abs(l1[step] - l2[step]) < 1e-4 * max(1.0, l1[step]), (step, l1[step], l2[step])
    assert (tmp_path / "a/evo2/checkpoints/iter_0000003").is_dir()


def test_tensor_parallel_2_trains(tmp_path):
    # the reference's TP communication overlap flag goes through Megatron-Bridge's comm-overlap setup, which turns
    # it off, saying so, where Transformer Engine's userbuffers are missing (here: no TE on CPU)
    tp2 = run_train([*TINY, "--max-steps", "4", "--eval-interval", "4", "--result-dir", str(tmp_path),
                     "--tensor-model-parallel-size", "2", "--disable-tensorboard-logger",
                     "--use-megatron-comm-overlap-llama3-8k", "--tp-comm-overlap-backend", "gloo"], nproc=2)
    l = losses(tp2.stdout)
    assert sorted(l) == [1, 2, 3, 4] and all(math.isfinite(v) for v in l.values())
    assert l[4] < l[1]
    assert "Disabling tensor parallel communication overlap due to TE not detected" in tp2.stdout + tp2.stderr


def test_kill_and_resume_reproduces_the_loss_curve(tmp_path):
    # bf16 with the long/medium Hyena filters kept fp32 in the model: the optimizer holds fp32 parameters beside the
    # fp32 main copies of bf16 ones, the mix megatron-core 0.19 cannot checkpoint without compat.mixed_dtype_optimizer.
    common = [*TINY, "--max-steps", "8", "--eval-interval", "4", "--disable-tensorboard-logger",
              "--mixed-precision-recipe", "bf16_mixed"]
    full = losses(run_train([*common, "--result-dir", str(tmp_path / "full")]).stdout)
    args = [*common, "--result-dir", str(tmp_path / "killed")]
    env = {**os.environ, "EVO2_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(train_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first = []
    for line in proc.stdout:
        first.append(line)
        if "successfully saved checkpoint from iteration       4" in line:
            proc.send_signal(signal.SIGKILL)  # kill -9 right after the step-4 checkpoint
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = losses(run_train(args).stdout)
    assert min(resumed) == 5 and max(resumed) == 8
    for step in range(5, 9):  # bit-for-bit continuation (same data order and RNG, exact optimizer state)
        assert resumed[step] == full[step], (step, resumed[step], full[step])

    stored = tensor_keys(tmp_path / "killed" / "evo2" / "checkpoints" / "iter_0000008")
    model = {k: m.properties.dtype for k, m in stored.items() if not k.startswith("optimizer.")}
    filters = {k for k in model if ".mixer.mixer.filter." in k}
    assert {k.rsplit(".", 1)[1] for k in filters} == {"h", "decay", "gamma", "R", "p"}, sorted(filters)
    assert {model[k] for k in filters} == {torch.float32}  # the StripedHyena filters stay fp32 in the model
    assert {model[k] for k in model.keys() - filters} == {torch.bfloat16}
    # Adam moments of the fp32 filters are stored under their own names, with their shapes.
    for key in filters - {k for k in filters if k.endswith(".decay")}:  # decay is a buffer
        assert stored[f"optimizer.state.exp_avg.{key}"].size == stored[key].size, key


def test_finetune_from_stripped_checkpoint_at_other_tp(tmp_path):
    base = run_train([*TINY, "--max-steps", "6", "--eval-interval", "6", "--result-dir", str(tmp_path / "base"),
                      "--tensor-model-parallel-size", "2", "--disable-tensorboard-logger"], nproc=2)
    base_losses = losses(base.stdout)
    stripped = tmp_path / "stripped"
    out = run_cli("evo2_remove_optimizer", "--src", tmp_path / "base/evo2/checkpoints", "--dst", stripped)
    assert out.returncode == 0, out.stderr
    ft = run_train([*TINY, "--max-steps", "3", "--eval-interval", "3", "--result-dir", str(tmp_path / "ft"),
                    "--finetune-ckpt-dir", str(stripped), "--disable-tensorboard-logger"])
    ft_losses = losses(ft.stdout)
    assert min(ft_losses) == 1  # weights only: the step counter restarts
    # loaded at TP=1 from a TP=2 run: starts near where the base run ended, far below its start
    assert ft_losses[1] < base_losses[1] - 0.5
    assert abs(ft_losses[1] - base_losses[6]) < abs(ft_losses[1] - base_losses[1])
    bad = run_train([*TINY, "--max-steps", "3", "--result-dir", str(tmp_path / "x"), "--finetune-ckpt-dir",
                     str(tmp_path)], check=False)
    assert bad.returncode != 0 and "holds no Megatron-Bridge checkpoint" in bad.stderr


def test_wandb_offline_and_tensorboard(tmp_path):
    run_train([*TINY, "--max-steps", "2", "--eval-interval", "2", "--result-dir", str(tmp_path),
               "--wandb-project", "evo2-test", "--wandb-offline"])
    run_dir = tmp_path / "evo2"
    assert list((run_dir / "wandb").rglob("offline-run-*")), list(run_dir.rglob("*"))[:20]
    assert list((run_dir / "tb_logs").glob("events.out.tfevents.*"))


def test_bad_flags_are_rejected(tmp_path):
    r = run_train(["--fasta-data", "--result-dir", str(tmp_path), "--cpu"], check=False)
    assert r.returncode != 0 and "--fasta-data and --fasta-file FILE go together" in r.stderr
    r = run_train([*TINY, "--max-steps", "3", "--result-dir", str(tmp_path), "model.num_layerz=3"], check=False)
    assert r.returncode != 0 and "num_layerz" in (r.stderr + r.stdout)


@pytest.mark.slow
def test_quickstart_real_phage_data_reaches_low_validation_loss(tmp_path):
    env = {**os.environ, "EVO2_CPU": "1", "RESULTS": str(tmp_path / "qs")}
    proc = subprocess.run(["bash", str(ROOT / "examples/quickstart.sh")], capture_output=True, text=True, env=env,
                          timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "qs.log").read_text()
    final = val_losses(log)
    assert final and min(final.values()) < math.log(4) - 0.1

"""Data parallelism: 2 processes (gloo, CPU) train exactly like one process on the same global batch."""
from __future__ import annotations

import glob
import json
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import synthetic
import main
import checkpoint
import encoding
import factory
import img_text_composition_models as models
import distributed as TF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def argv(data: str, log_dir: str, bert: str, loss: str) -> list[str]:
    return ["--dataset", "mitstates", "--dataset_path", data, "--model", "tirg", "--use_bert", "True",
            "--bert_model", bert, "--loss", loss, "--image_size", "32", "--batch_size", "8", "--num_iters", "2",
            "--log_every", "1", "--eval_every", "2", "--save_every", "2", "--train_eval_queries", "16",
            "--loader_num_workers", "0", "--device", "cpu", "--image_weights", "none", "--log_dir", log_dir,
            "--learning_rate", "0.002", "--seed", "3"]


def float64_patches() -> list[tuple[object, str, object]]:
    """(owner, name, replacement) that make a run train and evaluate in float64: the model is cast after its
    optimizer is built (the same Parameter objects), images and BERT vectors are cast as they come in.

    The comparison of 1 and 2 processes needs it. In float32 the two runs differ by rounding (the 2-process sums
    are split in two), ~1e-7 in conv1's weights after one step; at this tiny, randomly initialised ResNet's
    weights that moves the second step across a kink of the loss (a ReLU or max-pool switch): conv1's gradient
    jumps by 0.73 (max 11.1), and one process alone in float32 lands 0.24 away from its own float64 run. In
    float64 the two runs agree to ~1e-12 relative, so any real difference between them shows.
    """
    place, normalize = factory.place_model, models.normalize_images
    text = models.ImgEncoderTextEncoderBase.extract_text_feature

    def place_float64(args, model, device):
        return place(args, model, device).double()

    return [(factory, "place_model", place_float64),
            (models, "normalize_images", lambda imgs: normalize(imgs).double()),
            (models.ImgEncoderTextEncoderBase, "extract_text_feature", lambda self, t: text(self, t).double())]


def _worker(rank: int, world: int, port: int, args: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    for owner, name, value in float64_patches():  # this process ends with the run
        setattr(owner, name, value)
    assert main.main(args) == 0


def final_state(log_dir: str) -> tuple[dict, dict]:
    (ckpt,) = glob.glob(os.path.join(log_dir, "*", "latest_checkpoint.pth"))
    (metrics,) = glob.glob(os.path.join(log_dir, "*", "metrics.json"))
    with open(metrics) as f:
        return checkpoint.read_checkpoint(ckpt), json.load(f)["latest"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ddp_data"))
    synthetic.generate_synthetic(path, seed=1, image_size=32, n_train_nouns=3, n_test_nouns=2, adjectives_per_noun=3,
                                images_per_class=3)
    return path


@pytest.mark.parametrize("loss", ["batch_based_classification", "soft_triplet"])
def test_two_processes_match_one_process_on_the_same_global_batch(loss, tiny_data, tiny_bert_32, tmp_path,
                                                                   monkeypatch):
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    for owner, name, value in float64_patches():  # float64 on both sides: see float64_patches
        monkeypatch.setattr(owner, name, value)
    assert main.main(argv(tiny_data, single, tiny_bert_32, loss)) == 0
    mp.spawn(_worker, args=(2, free_port(), argv(tiny_data, double, tiny_bert_32, loss)), nprocs=2, join=True)
    (one, m1), (two, m2) = final_state(single), final_state(double)
    assert one["it"] == two["it"] == 2
    assert len(two["rng"]) == 2  # every process's random state is saved
    moved = 0
    for key, value in one["model_state_dict"].items():
        other = two["model_state_dict"][key]
        if value.is_floating_point():
            assert value.dtype == other.dtype == torch.float64, key
            torch.testing.assert_close(other, value, rtol=1e-7, atol=1e-9, msg=lambda m: f"{key}: {m}")
            moved += int(key.endswith("running_mean"))
        else:
            assert torch.equal(other, value), key
    assert moved > 10  # BatchNorm statistics are those of the global batch, in every layer
    # the sharded evaluation runs and reports every metric (its exact equality is tested in test_retrieval.py;
    # here the weights differ by rounding, which can flip a tie in a 36-query task)
    assert set(m2) == set(m1)


def _bn_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    bn = TF.convert_to_global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4))).double()
    part = x[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:  # every gathering helper, forward and backward
        warnings.simplefilter("always")
        y = TF.gather_batch(bn(part))
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        # the evaluation's gather: rank 0 holds rows 0 and 2, rank 1 row 1, of a (3, 2) table
        index = torch.tensor([0, 2]) if rank == 0 else torch.tensor([1])
        table = encoding._assemble_rows(10.0 * index[:, None] + torch.tensor([0.0, 1.0]), index, 3, world,
                                        torch.device("cpu"))
    grad_w = bn[0].weight.grad.clone()
    torch.distributed.all_reduce(grad_w)  # what DistributedDataParallel does, before its division by 2
    if rank == 0:
        torch.save({"y": y.detach(), "grad_w": grad_w, "mean": bn[0].running_mean, "var": bn[0].running_var,
                    "part_grad": part.grad, "table": table,
                    "future_warnings": [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]},
                   out)
    torch.distributed.destroy_process_group()


def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "bn.pt")
    mp.spawn(_bn_worker, args=(2, free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    bn = torch.nn.BatchNorm2d(4).double()
    y = bn(x)
    (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    torch.testing.assert_close(got["y"], y.detach())
    torch.testing.assert_close(got["mean"], bn.running_mean)
    torch.testing.assert_close(got["var"], bn.running_var)
    # every process holds the global loss, so the summed gradient is 2x; DDP's average halves it to the true one
    torch.testing.assert_close(got["grad_w"] / 2, bn.weight.grad)
    # the gather's backward sums over the processes the gradient of each process's own rows, so the same 2x
    torch.testing.assert_close(got["part_grad"] / 2, x.grad[:3])
    assert torch.equal(got["table"], torch.tensor([[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]]))
    assert got["future_warnings"] == []  # no deprecated torch.distributed API


def test_global_batchnorm_keeps_keys_and_is_plain_batchnorm_in_one_process():
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    converted = TF.convert_to_global_batchnorm(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)))
    converted.load_state_dict(plain.state_dict())
    assert isinstance(converted[1], TF.GlobalBatchNorm)
    assert list(converted.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 3)
    torch.testing.assert_close(converted(x), plain(x))


class _Listed:
    """A split's bookkeeping as completeness reads it: four listed images, none missing."""

    def __init__(self) -> None:
        self.missing, self.bad_images = frozenset(), set()

    def listed_groups(self) -> dict:
        return {"": [f"img{i}.jpg" for i in range(4)]}


def _close_worker(rank: int, world: int, port: int, folder: str) -> None:
    import datetime

    import config
    import runlog
    from retrieval_datasets import completeness

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    args = config.get_args_parser().parse_args([])
    vars(args).update(dataset="mitstates", log_dir=os.path.dirname(folder), test_only=False, resume="x")
    # a resumed run that trains nothing more: rank 0 reads the folder's history, the other ranks hold none
    run = runlog.Run(args, folder, enabled=rank == 0)
    train, test = _Listed(), _Listed()
    record = completeness.DataRecord({"train": train, "test": test}, "Tiny")
    train.bad_images.add(f"img{rank}.jpg")  # each rank met another unreadable training image
    if rank == 1:
        test.bad_images.add("img3.jpg")
    torch.save(record()["data"], f"{folder}.{rank}")  # what every rank counts, gathered
    run.live_info = record
    run.close({}, 2)  # every rank gathers again: none waits for another forever
    torch.distributed.destroy_process_group()


def test_unreadable_images_of_every_rank_are_counted_and_a_resumed_run_closes(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"latest": {"it": 2}, "history": [{"it": 2}]}))
    mp.spawn(_close_worker, args=(2, free_port(), str(folder)), nprocs=2, join=True)
    expected = {"train": {"listed": 4, "present": 4, "unreadable": 2}, "test": {"listed": 4, "present": 4,
                                                                             "unreadable": 1}}
    for rank in (0, 1):
        assert torch.load(f"{folder}.{rank}") == expected
    with open(folder / "metrics.json") as f:
        assert json.load(f)["data"] == expected

"""The wiring's one home: models built from a checkpoint's own settings (factory.model_from_checkpoint)."""
from __future__ import annotations

import argparse
import glob

import pytest
import torch

import config
import datasets
import factory
import main
import synthetic
from errors import UserInputError


@pytest.fixture(scope="module")
def tirg_checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("factory")
    data = str(root / "data")
    synthetic.generate_synthetic(data, seed=0, image_size=32, n_train_nouns=2, n_test_nouns=1, adjectives_per_noun=3,
                                 images_per_class=3)
    argv = ["--dataset", "mitstates", "--dataset_path", data, "--model", "tirg", "--use_bert", "False",
            "--lstm_dim", "24", "--image_embed_dim", "40", "--image_size", "32", "--batch_size", "4", "--num_iters",
            "2", "--train_eval_queries", "8", "--loader_num_workers", "0", "--log_dir", str(root / "logs"),
            "--device", "cpu", "--image_weights", "none", "--eval_every", "1000"]
    assert main.main(argv) == 0
    (path,) = glob.glob(str(root / "logs" / "*" / "latest_checkpoint.pth"))
    return path


def test_model_from_checkpoint_takes_the_checkpoints_settings_and_weights(tirg_checkpoint):
    model, args, ckpt = factory.model_from_checkpoint(tirg_checkpoint, torch.device("cpu"))
    assert (args.model, args.use_bert, args.lstm_dim, args.image_embed_dim, args.image_size) == ("tirg", False, 24, 40, 32)
    assert not model.training
    state = model.state_dict()
    assert state.keys() == ckpt["model_state_dict"].keys()
    assert all(torch.equal(state[k], v) for k, v in ckpt["model_state_dict"].items())


def test_original_format_settings_come_from_its_namespace(tirg_checkpoint, tmp_path):
    ckpt = torch.load(tirg_checkpoint, map_location="cpu", weights_only=False)
    original = {"it": ckpt["it"], "model_state_dict": ckpt["model_state_dict"],
                "opt": argparse.Namespace(model="tirg", use_bert=False, image_embed_dim=40, dataset="mitstates",
                                          loss="soft_triplet", lstm_dim=24)}
    path = str(tmp_path / "original.pth")
    torch.save(original, path)
    args = config.checkpoint_args(original)
    assert (args.model, args.image_embed_dim, args.lstm_dim, args.loss, args.image_size) == ("tirg", 40, 24, "soft_triplet", 224)
    with pytest.raises(UserInputError, match="without a vocabulary"):
        factory.model_from_checkpoint(path, torch.device("cpu"))
    texts = datasets.MITStates(ckpt["args"]["dataset_path"], "train", image_size=32).get_all_texts()
    model, _, _ = factory.model_from_checkpoint(path, torch.device("cpu"), texts=texts)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["model_state_dict"].items())

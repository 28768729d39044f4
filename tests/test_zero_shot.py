"""Zero-shot classification and retrieval against CLIP_benchmark (linear probes: test_linear_probe.py)."""

from __future__ import annotations

import math

import numpy as np
import open_clip  # test-only reference tokenizer: the same ids as OpenAI's
import pytest
import torch
from torch.utils.data import DataLoader

from clip.data.eval_datasets import load_classification_set, load_retrieval_set
from clip.data.eval_shards import collate_eval_batch
from clip.models.text_packing import PackedText
from clip.transforms import image_transform_eval
from clip.zero_shot import (
    build_zero_shot_classifier,
    classification_metrics,
    evaluate,
    evaluate_retrieval,
    evaluate_zero_shot,
    format_prompt,
    retrieval_metrics,
)
from tests.eval_fixtures import one_thread, tiny_model, write_caption_set, write_image_folder  # noqa: F401

TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of the {}."]


def test_format_prompt_accepts_both_placeholders_and_rejects_none():
    assert format_prompt("a photo of a {}.", "dog") == "a photo of a dog."
    assert format_prompt("a photo of a {c}.", "dog") == "a photo of a dog."
    with pytest.raises(ValueError, match="no '{}' or '{c}' placeholder"):
        format_prompt("a photo", "dog")


def test_classifier_is_renormalised_mean_of_normalised_prompt_embeddings():
    model = tiny_model()
    classnames = ["cat", "dog", "tree"]
    weights = build_zero_shot_classifier(model, open_clip.tokenize, classnames, TEMPLATES)
    assert weights.shape == (model.config.embed_dim, 3)
    with torch.no_grad():
        for index, name in enumerate(classnames):
            prompts = open_clip.tokenize([template.format(name) for template in TEMPLATES])
            embeddings = model.encode_text(prompts)
            mean = (embeddings / embeddings.norm(dim=-1, keepdim=True)).mean(dim=0)
            torch.testing.assert_close(weights[:, index], mean / mean.norm())


def spy_on_encode_text(model, monkeypatch) -> list:
    """The text inputs of each of `model.encode_text`'s calls, from now on."""
    calls, encode_text = [], model.encode_text

    def spy(text, normalize=False):
        calls.append(text)
        return encode_text(text, normalize)

    monkeypatch.setattr(model, "encode_text", spy)
    return calls


def test_classifier_packs_the_prompts_of_whole_classes_per_call(monkeypatch):
    """Our CLIP gets a few classes' prompts per call, without the padding after each prompt
    (clip.models.text_packing); the weights equal one padded call per class."""
    model = tiny_model()
    classnames = [f"class {i}" for i in range(7)]
    reference = build_zero_shot_classifier(PaddedOnly(model), open_clip.tokenize, classnames, TEMPLATES)
    calls = spy_on_encode_text(model, monkeypatch)
    weights = build_zero_shot_classifier(model, open_clip.tokenize, classnames, TEMPLATES, prompts_per_call=7)
    # 7 prompts per call hold 2 classes of 3 templates.
    assert [len(text) for text in calls] == [6, 6, 6, 3]
    assert all(isinstance(text, PackedText) and text.num_tokens <= len(text) * 16 for text in calls)
    torch.testing.assert_close(weights, reference, rtol=0, atol=1e-6)


class PaddedOnly(torch.nn.Module):
    """A model that is not our CLIP (an OpenCLIP or HF one, say): it only takes padded token rows."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def encode_text(self, text, normalize=False):
        assert isinstance(text, torch.Tensor), type(text)
        return self.model.encode_text(text, normalize)

    def encode_image(self, images, normalize=False):
        return self.model.encode_image(images, normalize)


def test_retrieval_packs_our_captions_and_pads_other_models(tmp_path, monkeypatch):
    captions_file = write_caption_set(tmp_path, num_images=12)
    model = tiny_model()
    eval_set = load_retrieval_set(captions_file, image_transform_eval(32), images=tmp_path, name="coco")
    padded = evaluate_retrieval(PaddedOnly(model), eval_set.dataset, open_clip.tokenize, batch_size=5)
    calls = spy_on_encode_text(model, monkeypatch)
    packed = evaluate_retrieval(model, eval_set.dataset, open_clip.tokenize, batch_size=5)
    assert len(calls) == 3 and all(isinstance(text, PackedText) for text in calls)
    assert packed == padded


def test_classification_metrics_on_handmade_logits():
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4],  # label 0: top-1 hit
            [9.0, 8, 7, 6, 5, 4],  # label 4: top-5 hit only
            [9.0, 8, 7, 6, 5, 4],  # label 5: miss
            [0.0, 9, 1, 1, 1, 1],  # label 1: top-1 hit
        ]
    )
    metrics = classification_metrics(logits, torch.tensor([0, 4, 5, 1]))
    assert metrics["top1"] == 0.5 and metrics["top5"] == 0.75 and metrics["num_samples"] == 4
    # classes 0 and 1 fully right, 4 and 5 fully wrong; absent classes do not count
    assert metrics["mean_per_class_recall"] == 0.5
    assert "top5" not in classification_metrics(logits[:, :3], torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="6 classes"):
        classification_metrics(logits, torch.tensor([0, 1, 2, 6]))


def test_mean_per_class_recall_equals_sklearn_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 7, generator=generator)
    labels = torch.randint(0, 6, (300,), generator=generator)  # class 6 never occurs
    ours = classification_metrics(logits, labels)["mean_per_class_recall"]
    with pytest.warns(UserWarning):  # sklearn warns about the predicted class that has no samples
        reference = balanced_accuracy_score(labels.numpy(), logits.argmax(dim=1).numpy())
    assert ours == pytest.approx(reference, rel=1e-12)


def test_zero_shot_equals_clip_benchmark(tmp_path, monkeypatch):
    """Same model, tokenizer and images through CLIP_benchmark's evaluate and ours.

    top-1/top-5 are compared exactly: both take topk of the same float32 logits. The per-class mean
    and the classifier weights (same ops, different reduction/batching order) to float tolerance.
    """
    from clip_benchmark.metrics import zeroshot_classification as reference

    # CLIP_benchmark's `accuracy` calls float() on a 1-element array, which numpy >= 2.4 refuses;
    # this shim converts the same value the way older numpy did.
    monkeypatch.setattr(reference, "float", lambda value: np.asarray(value).item(), raising=False)

    classnames = write_image_folder(tmp_path / "set", num_classes=12, per_class=5, templates=TEMPLATES)
    model = tiny_model()
    eval_set = load_classification_set(tmp_path / "set", image_transform_eval(32))
    assert eval_set.classnames == classnames and eval_set.templates == TEMPLATES

    ours = evaluate_zero_shot(
        model, eval_set.dataset, classnames, TEMPLATES, open_clip.tokenize, name="synth", batch_size=16
    )
    loader = DataLoader(eval_set.dataset, batch_size=7)
    theirs_templates = [template.replace("{}", "{c}") for template in TEMPLATES]
    theirs = reference.evaluate(model, loader, open_clip.tokenize, classnames, theirs_templates, "cpu", amp=False)

    assert ours["eval/synth_num_samples"] == 60
    assert ours["eval/synth_top1"] == theirs["acc1"]
    assert ours["eval/synth_top5"] == theirs["acc5"]
    assert ours["eval/synth_mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], rel=1e-12)
    # A random tiny model is far from 0% and 100%: the comparison can fail.
    assert 0.0 < ours["eval/synth_top1"] < ours["eval/synth_top5"] < 1.0

    classifier = build_zero_shot_classifier(model, open_clip.tokenize, classnames, TEMPLATES)
    reference_classifier = reference.zero_shot_classifier(
        model, open_clip.tokenize, classnames, theirs_templates, "cpu", amp=False
    )
    torch.testing.assert_close(classifier, reference_classifier, rtol=0, atol=1e-6)


def test_retrieval_equals_clip_benchmark(tmp_path):
    """Recall@1/5/10 both ways, images with 1 to 4 captions, against CLIP_benchmark (exact: both
    take topk of the same [texts, images] float32 score matrix)."""
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval as reference

    captions_file = write_caption_set(tmp_path, num_images=24)
    model = tiny_model()
    eval_set = load_retrieval_set(captions_file, image_transform_eval(32), images=tmp_path, name="coco")
    ours = evaluate_retrieval(model, eval_set.dataset, open_clip.tokenize, name=eval_set.name, batch_size=5)
    loader = DataLoader(eval_set.dataset, batch_size=6, collate_fn=image_captions_collate_fn)
    theirs = reference.evaluate(model, loader, open_clip.tokenize, "cpu", amp=False, recall_k_list=[1, 5, 10])

    assert ours["eval/coco_num_images"] == 24 and ours["eval/coco_num_texts"] > 24
    for key, value in theirs.items():
        assert ours[f"eval/coco_{key}"] == value, key
    assert 0.0 < ours["eval/coco_image_retrieval_recall@1"] < 1.0
    assert ours == evaluate(model, eval_set, open_clip.tokenize, batch_size=24)


def test_retrieval_metrics_on_handmade_scores():
    # 3 images (one-hot features); captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0.2, 0, 1], [0, 1, 0], [1, 0, 0.5]])
    texts = texts / texts.norm(dim=1, keepdim=True)
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    # caption -> image: captions 0 and 2 find theirs first; 1 ranks image 2 then 0; 3 ranks 0 then 2.
    assert metrics["image_retrieval_recall@1"] == 0.5
    assert metrics["image_retrieval_recall@2"] == 1.0
    # image -> caption: image 0 finds caption 0, image 1 caption 2; image 2 ranks caption 1 (image
    # 0's) before its own caption 3.
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@2"] == 1.0


def test_eval_hooks_restore_each_modules_mode(tmp_path):
    write_image_folder(tmp_path / "set", num_classes=3, per_class=2)
    model = tiny_model().train()
    model.visual.eval()  # a locked tower the trainer keeps in eval mode
    eval_set = load_classification_set(tmp_path / "set", image_transform_eval(32))
    metrics = evaluate(model, eval_set, open_clip.tokenize)
    assert model.training and model.transformer.training
    assert not any(module.training for module in model.visual.modules())
    assert set(metrics) == {"eval/set_top1", "eval/set_mean_per_class_recall", "eval/set_num_samples"}


def test_a_label_beyond_the_class_names_names_the_set_and_the_valid_range():
    # E.g. eval shards whose `cls` members count from 1, or a classnames.txt one line short.
    images = [(torch.zeros(3, 32, 32), label) for label in (0, 1, 2)]
    message = r"eval set 'mine': labels span \[0, 2\], but there are 2 classes: labels must be class indices 0 to 1"
    with pytest.raises(ValueError, match=message):
        evaluate_zero_shot(tiny_model(), images, ["cat", "dog"], ["a {}."], open_clip.tokenize, name="mine")


def test_autocast_runs_and_returns_float_metrics(tmp_path):
    write_image_folder(tmp_path / "set", num_classes=5, per_class=2)
    captions = write_caption_set(tmp_path / "coco", num_images=4)
    model = tiny_model()
    transform = image_transform_eval(32)
    for eval_set in (load_classification_set(tmp_path / "set", transform), load_retrieval_set(captions, transform)):
        metrics = evaluate(model, eval_set, open_clip.tokenize, autocast_dtype=torch.bfloat16)
        assert all(isinstance(value, (int, float)) and math.isfinite(value) for value in metrics.values())
        assert next(model.parameters()).dtype == torch.float32


def test_collate_keeps_caption_lists():
    images, captions = collate_eval_batch([(torch.zeros(3, 2, 2), ["a", "b"]), (torch.ones(3, 2, 2), ["c"])])
    assert images.shape == (2, 3, 2, 2) and captions == [["a", "b"], ["c"]]
    images, labels = collate_eval_batch([(torch.zeros(3, 2, 2), 4), (torch.ones(3, 2, 2), 1)])
    assert labels.tolist() == [4, 1]

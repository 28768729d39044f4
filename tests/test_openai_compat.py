"""OpenAI's `clip` package, used as its README and notebooks use it, runs against ours unedited.

Weights come from a tiny random model written as OpenAI's releases are (a traced fp16 archive) and
found where `clip.load("ViT-B/32")` looks, with its sha256 in the URL table as for the real files.
"""

import hashlib
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from references import write_openai_archive

import clip
import clip.api

# OpenAI CLIP's README example (https://github.com/openai/CLIP, MIT License), verbatim.
README_EXAMPLE = """
import torch
import clip
from PIL import Image

device = "cuda" if torch.cuda.is_available() else "cpu"
model, preprocess = clip.load("ViT-B/32", device=device)

image = preprocess(Image.open("CLIP.png")).unsqueeze(0).to(device)
text = clip.tokenize(["a diagram", "a dog", "a cat"]).to(device)

with torch.no_grad():
    image_features = model.encode_image(image)
    text_features = model.encode_text(text)

    logits_per_image, logits_per_text = model(image, text)
    probs = logits_per_image.softmax(dim=-1).cpu().numpy()

print("Label probs:", probs)  # prints: [[0.9927937  0.00421068 0.00299572]]
"""

# Lines of OpenAI's notebooks (Interacting_with_CLIP, Prompt_Engineering_for_ImageNet; MIT License) that
# run on a CPU (their `.cuda()` calls aside; skimage's images replaced by one generated image), and the
# calls OpenAI's own code makes: `load(name=..., jit=False)` by its parameter names, clip.load's
# `_transform(model.visual.input_resolution)` and `build_model(state_dict)`, `SimpleTokenizer().decode`.
NOTEBOOK_IDIOMS = """
import numpy as np
import torch
import clip
from clip.clip import _transform
from clip.model import build_model
from clip.simple_tokenizer import SimpleTokenizer

clip.available_models()
model, preprocess = clip.load(name="ViT-B/32", device="cpu", jit=False)
model.eval()
input_resolution = model.visual.input_resolution
context_length = model.context_length
vocab_size = model.vocab_size
print("Model parameters:", f"{np.sum([int(np.prod(p.shape)) for p in model.parameters()]):,}")
print("Input resolution:", input_resolution)
print("Context length:", context_length)
print("Vocab size:", vocab_size)

tokens = clip.tokenize("Hello World!")
decoded = SimpleTokenizer().decode(tokens[0].tolist())
preprocess = _transform(model.visual.input_resolution)
images = [preprocess(Image.open("CLIP.png").convert("RGB"))]
image_input = torch.tensor(np.stack(images))
with torch.no_grad():
    image_features = model.encode_image(image_input).float()
    text_features = model.encode_text(tokens).float()
image_features /= image_features.norm(dim=-1, keepdim=True)
text_features /= text_features.norm(dim=-1, keepdim=True)
similarity = text_features.cpu().numpy() @ image_features.cpu().numpy().T
output_dim = model.visual.output_dim

texts = ["a page of text about segmentation", "a facial photo of a tabby cat", "a rocket standing on a launchpad",
         "a portrait of an astronaut with the American flag", "a red motorcycle standing in a garage"]
text_tokens = clip.tokenize(["This is " + desc for desc in texts])
with torch.no_grad():
    text_features = model.encode_text(text_tokens).float()
    text_features /= text_features.norm(dim=-1, keepdim=True)

text_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)
top_probs, top_labels = text_probs.cpu().topk(5, dim=-1)

rebuilt = build_model(model.state_dict()).float()
"""

# OpenAI's Prompt_Engineering_for_ImageNet notebook from the model on, verbatim but for `.cuda()`, a
# tqdm that shows nothing, five classes and two templates (of its 1000 and 80), ImageNetV2 replaced by
# generated images with labels, and `accuracy`'s `float(array of shape [1])`, which NumPy 2.4 refuses
# whatever the model (`.item()` instead).
PROMPT_ENGINEERING = """
model, preprocess = clip.load("ViT-B/32")

imagenet_classes = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]
imagenet_templates = ['a bad photo of a {}.', 'a photo of many {}.']

images = GeneratedImages(transform=preprocess)
loader = torch.utils.data.DataLoader(images, batch_size=32, num_workers=2)

def zeroshot_classifier(classnames, templates):
    with torch.no_grad():
        zeroshot_weights = []
        for classname in tqdm(classnames):
            texts = [template.format(classname) for template in templates] #format with class
            texts = clip.tokenize(texts) #tokenize
            class_embeddings = model.encode_text(texts) #embed with text encoder
            class_embeddings /= class_embeddings.norm(dim=-1, keepdim=True)
            class_embedding = class_embeddings.mean(dim=0)
            class_embedding /= class_embedding.norm()
            zeroshot_weights.append(class_embedding)
        zeroshot_weights = torch.stack(zeroshot_weights, dim=1)
    return zeroshot_weights


zeroshot_weights = zeroshot_classifier(imagenet_classes, imagenet_templates)

def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy().item() for k in topk]

with torch.no_grad():
    top1, top5, n = 0., 0., 0.
    for i, (images, target) in enumerate(tqdm(loader)):
        images = images
        target = target

        # predict
        image_features = model.encode_image(images)
        image_features /= image_features.norm(dim=-1, keepdim=True)
        logits = 100. * image_features @ zeroshot_weights

        # measure accuracy
        acc1, acc5 = accuracy(logits, target, topk=(1, 5))
        top1 += acc1
        top5 += acc5
        n += images.size(0)

top1 = (top1 / n) * 100
top5 = (top5 / n) * 100

print(f"Top-1 accuracy: {top1:.2f}")
print(f"Top-5 accuracy: {top5:.2f}")
"""


class GeneratedImages(torch.utils.data.Dataset):
    """ImageNetV2Dataset's interface: (image, label) pairs through `transform`."""

    def __init__(self, transform):
        rng = np.random.default_rng(1)
        self.images = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(40)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), index % 5


@pytest.fixture
def openai_download_root(tmp_path, monkeypatch):
    """`clip.load("ViT-B/32")` finds a tiny QuickGELU archive in the default download root; returns the
    TorchScript reference that archive runs as (fp32)."""
    root = tmp_path / "cache"
    root.mkdir()
    write_openai_archive(root / "ViT-B-32.pt", activation="quick_gelu")
    sha256 = hashlib.sha256((root / "ViT-B-32.pt").read_bytes()).hexdigest()
    monkeypatch.setitem(clip.api._OPENAI_URLS, "ViT-B/32",
                        f"https://openaipublic.azureedge.net/clip/models/{sha256}/ViT-B-32.pt")  # fmt: skip
    monkeypatch.setattr(clip.api, "DEFAULT_DOWNLOAD_ROOT", str(root))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "CLIP.png")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(root / "ViT-B-32.pt")).float().eval()


def test_openai_readme_example_runs_unedited(openai_download_root, capsys):
    namespace = {}
    exec(compile(README_EXAMPLE, "OpenAI README", "exec"), namespace)  # noqa: S102 (running the examples is the test)
    reference = openai_download_root
    assert namespace["probs"].shape == (1, 3) and np.isclose(namespace["probs"].sum(), 1)
    with torch.no_grad():  # what OpenAI's load (jit=False, on the CPU) computes: the archive's function in fp32
        expected = reference(namespace["image"], namespace["text"])[0]  # a traced archive has only forward
    got = namespace["logits_per_image"]
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert "Label probs:" in capsys.readouterr().out


def test_openai_notebook_idioms_run_unedited(openai_download_root):
    from open_clip.tokenizer import SimpleTokenizer as OpenCLIPSimpleTokenizer

    namespace = {"Image": Image}
    exec(compile(textwrap.dedent(NOTEBOOK_IDIOMS), "OpenAI notebooks", "exec"), namespace)  # noqa: S102 (running the examples is the test)
    model = namespace["model"]
    assert (namespace["input_resolution"], namespace["context_length"], namespace["vocab_size"]) == (32, 77, 49408)
    assert namespace["output_dim"] == 32 and model.dtype == torch.float32
    # OpenCLIP's SimpleTokenizer is OpenAI's with the two special tokens renamed.
    expected = OpenCLIPSimpleTokenizer().decode(namespace["tokens"][0].tolist())
    expected = expected.replace("<start_of_text>", "<|startoftext|>").replace("<end_of_text>", "<|endoftext|>")
    assert namespace["decoded"] == expected and namespace["decoded"].startswith("<|startoftext|>hello world ! ")
    assert namespace["similarity"].shape == (1, 1)
    assert namespace["text_probs"].shape == (1, 5) and torch.allclose(namespace["text_probs"].sum(), torch.tensor(1.0))
    # Against OpenAI's own function (the archive's traced forward): its logits over its temperature are
    # the cosines. Float32 cosines agree to ~1e-6; 100 x that bounds the logits of text_probs' softmax.
    reference, image = openai_download_root, namespace["image_input"]
    with torch.no_grad():
        scale = model.logit_scale.exp()
        cosine = reference(image, namespace["tokens"])[1] / scale  # [texts, images], as `similarity`
        cosines = reference(image, namespace["text_tokens"])[0] / scale  # [images, texts]
    assert np.allclose(namespace["similarity"], cosine.numpy(), rtol=0, atol=1e-5)
    assert torch.allclose(namespace["text_probs"], (100.0 * cosines).softmax(dim=-1), rtol=0, atol=1e-3)
    assert sorted(namespace["top_labels"][0].tolist()) == [0, 1, 2, 3, 4]
    rebuilt = namespace["rebuilt"]
    with torch.no_grad():
        image = namespace["image_input"]
        assert torch.allclose(rebuilt.encode_image(image), model.encode_image(image), rtol=1e-3, atol=1e-4)


def test_openai_prompt_engineering_notebook_runs(openai_download_root, capsys):
    namespace = {"GeneratedImages": GeneratedImages, "tqdm": lambda iterable: iterable}
    exec(compile("import numpy as np\nimport torch\nimport clip\n" + PROMPT_ENGINEERING, "notebook", "exec"), namespace)  # noqa: S102 (running the examples is the test)
    weights = namespace["zeroshot_weights"]  # [embed_dim, classes], unit columns
    assert weights.shape == (32, 5) and torch.allclose(weights.norm(dim=0), torch.ones(5), atol=1e-6)
    # With five classes every label is in the top 5; top-1 is the share of images whose label wins.
    model, preprocess = namespace["model"], namespace["preprocess"]
    dataset = GeneratedImages(transform=preprocess)
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        predicted = (model.encode_image(images) @ weights).argmax(dim=1)
    expected_top1 = (int((predicted == torch.arange(len(dataset)) % 5).sum()) / len(dataset)) * 100
    assert namespace["top5"] == 100.0 and namespace["top1"] == expected_top1
    assert "Top-1 accuracy:" in capsys.readouterr().out


def test_openai_modules_are_aliases_of_the_library():
    import clip.clip
    import clip.model
    import clip.simple_tokenizer
    from clip.transforms import image_transform_eval

    assert clip.clip.load is clip.load and clip.clip.tokenize is clip.tokenize
    assert clip.clip.available_models is clip.available_models and clip.clip._transform is image_transform_eval
    assert clip.clip._MODELS is clip.api._OPENAI_URLS and clip.model.CLIP is clip.CLIP
    assert clip.clip.__all__ == ["available_models", "load", "tokenize"]


@pytest.mark.parametrize("name, overrides", [("tiny-vit", {"vision_head_width": 64}), ("tiny-resnet", {})])
def test_build_model_is_openais(name, overrides):
    # OpenCLIP's build_model_from_openai_state_dict is a port of OpenAI's build_model (QuickGELU, fp16),
    # which knows only 64-wide attention heads.
    from open_clip.model import build_model_from_openai_state_dict

    from clip.model import build_model

    model = clip.create_model(name, activation="quick_gelu", text_width=64, text_heads=1, **overrides)
    state_dict = model.state_dict()
    ours = build_model(state_dict)
    reference = build_model_from_openai_state_dict(dict(state_dict))
    assert not ours.training and ours.dtype == torch.float16
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in reference.state_dict().items()}
    images = torch.randn(2, 3, ours.visual.input_resolution, ours.visual.input_resolution)
    text = clip.tokenize(["a dog", "a photo of a cat"])
    with torch.no_grad():
        ours, reference = ours.float(), reference.float()
        for got, expected in ((ours.encode_image(images), reference.encode_image(images)),
                              (ours.encode_text(text), reference.encode_text(text))):  # fmt: skip
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_simple_tokenizer_encodes_and_decodes_as_openais():
    from open_clip.tokenizer import SimpleTokenizer as OpenCLIPSimpleTokenizer

    from clip.simple_tokenizer import SimpleTokenizer

    ours, reference = SimpleTokenizer(), OpenCLIPSimpleTokenizer()
    for text in ["Hello, World!  it's 2024", "日本語のテキスト &amp; emoji 🙂", "a photo of a cat."]:
        assert ours.encode(text) == reference.encode(text)
    generator = np.random.default_rng(0)
    for _ in range(300):  # any ids: special tokens, padding zeros, byte tokens that split UTF-8 characters
        ids = generator.integers(0, 49408, generator.integers(1, 12)).tolist()
        ids = [49406, *ids, 49407, 0] if generator.random() < 0.3 else ids
        ids = generator.integers(0, 256, 5).tolist() if generator.random() < 0.3 else ids
        expected = reference.decode(ids).replace("<start_of_text>", "<|startoftext|>")
        assert ours.decode(ids) == expected.replace("<end_of_text>", "<|endoftext|>"), ids
    assert ours.encoder["<|endoftext|>"] == 49407 and ours.decoder[49406] == "<|startoftext|>"


def test_tokenize_dtype_difference_changes_nothing():
    # OpenAI's tokenize returns int32 (torch >= 1.8), ours torch.long (see docs/api.md): same values, same features.
    tokens = clip.tokenize(["a diagram", "a dog"])
    assert tokens.dtype == torch.long
    model = clip.create_model("tiny-vit").eval()
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens.int()), model.encode_text(tokens))

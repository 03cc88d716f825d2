"""The offline calibration / evaluation text."""
from a2ats_lite.corpus import documents, natural_text, random_identifiers


def test_splits_are_disjoint_prose():
    calib, ev = natural_text("calib"), natural_text("eval")
    assert len(calib) > 100_000 and len(ev) > 100_000
    # whole topic pages go to one side only (short boilerplate paragraphs may recur)
    from a2ats_lite.corpus import _topics
    pages = [text for _, text in _topics()]
    assert all((page in calib) != (page in ev) for page in pages if len(page) > 2000)


def test_identifiers_are_deterministic_and_sized():
    a, b = random_identifiers(5000, seed=3), random_identifiers(5000, seed=3)
    assert a == b and a != random_identifiers(5000, seed=4)
    assert 5000 <= len(a) < 5200 and a.count("-") >= 4 * 100


class _Tok:
    bos_id = 1

    def encode(self, text, add_bos=False):
        return [ord(c) % 50 + 2 for c in text]


def test_documents_sizes_and_bos():
    docs = documents(_Tok(), n_tokens=10_000, doc_tokens=1000, id_fraction=0.2)
    assert all(d[0] == 1 and len(d) <= 1001 for d in docs)
    total = sum(len(d) - 1 for d in docs)
    assert total == 10_000

"""The cross-tokenizer baselines (mined, dskd, alm) against direct loop implementations written here."""
import math
import random

import pytest
import torch

from bld_scale.data.batch import PairTokenizer, collate
from bld_scale.model.projectors import DualSpaceProjectors
from bld_scale.train.baselines.alm import alm_loss
from bld_scale.train.baselines.dskd import dskd_terms
from bld_scale.train.baselines.edit_distance import edit_distance_matrix, nearest_token_map
from bld_scale.train.baselines.mined import align_tokens, mapped_teacher_logprobs, mined_loss
from vocab_tables import table_vocab


def levenshtein(a: bytes, b: bytes) -> int:
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[len(a)][len(b)]


def _random_bytes(rng, alphabet, lengths):
    return bytes(rng.choice(alphabet) for _ in range(rng.choice(lengths)))


# ------------------------------------------------------------------------------ edit distance
def test_edit_distances_match_the_textbook_table():
    rng = random.Random(0)
    # lengths around the word limits (14: int16, 30: int32, 63: int64 words, past it: the fallback)
    patterns = [_random_bytes(rng, b"ab\xc3\x00", [0, 1, 2, 5, 14, 15, 30, 31, 63]) for _ in range(45)] + [None]
    patterns += [b"ab" * 32, bytes(70)]
    texts = [_random_bytes(rng, b"ab\xc3\x00", range(13)) for _ in range(25)] + [None, b"a" * 75]
    got = edit_distance_matrix(patterns, texts)
    want = [[levenshtein(p or b"", t or b"") for t in texts] for p in patterns]
    assert got.tolist() == want


def test_nearest_token_map_is_the_first_minimum_and_skips_tokens_without_bytes():
    rng = random.Random(1)
    source = [_random_bytes(rng, b"abc ", range(9)) for _ in range(150)] + [None]
    target = [None] + [_random_bytes(rng, b"abc ", range(1, 6)) for _ in range(40)] + [None]
    got = nearest_token_map(source, target).tolist()
    for s, g in zip(source, got):
        if not s:
            assert g == -1
            continue
        dists = [(levenshtein(s, t), j) for j, t in enumerate(target) if t]
        assert g == min(dists)[1]  # smallest distance, then smallest id
    assert nearest_token_map(source, target) is nearest_token_map(source, target)  # cached per pair


# ------------------------------------------------------------------------------ mined
def _dtw_minimum(cost):
    """Minimal total cost of a monotone path (diagonal, down, right steps), by the plain table."""
    J, L = len(cost), len(cost[0])
    best = [[math.inf] * L for _ in range(J)]
    for j in range(J):
        for k in range(L):
            before = 0.0 if j == k == 0 else min(best[j - 1][k - 1] if j and k else math.inf,
                                                best[j - 1][k] if j else math.inf,
                                                best[j][k - 1] if k else math.inf)
            best[j][k] = cost[j][k] + before
    return best[-1][-1]


@pytest.mark.parametrize("seed", range(4))
def test_token_alignment_is_a_minimal_dtw_path(seed):
    from bld_scale.train.baselines.mined import dtw_path

    rng = random.Random(seed)
    student = [_random_bytes(rng, b"ab ", range(1, 5)) for _ in range(rng.randint(1, 9))]
    teacher = [_random_bytes(rng, b"ab ", range(1, 5)) for _ in range(rng.randint(1, 9))]
    cost = [[levenshtein(s, t) for t in teacher] for s in student]
    path = dtw_path(edit_distance_matrix(student, teacher).numpy().astype(float))
    assert path[0] == (0, 0) and path[-1] == (len(student) - 1, len(teacher) - 1)
    for (j0, k0), (j1, k1) in zip(path, path[1:]):
        assert (j1 - j0, k1 - k0) in {(1, 1), (1, 0), (0, 1)}
    assert sum(cost[j][k] for j, k in path) == _dtw_minimum(cost)
    aligned = align_tokens(student, teacher)
    for j, k in enumerate(aligned):  # the cheapest teacher token among those on the path
        on_path = [kk for jj, kk in path if jj == j]
        assert (j, k) in path and cost[j][k] == min(cost[j][kk] for kk in on_path)


def test_token_alignment_of_two_tokenizations_of_one_text():
    student = [b"to", b" be", b" or", b" not"]
    teacher = [b"t", b"o", b" be", b" or not"]
    # by hand: (to,t) 1 + (to,o) 1 + ( be, be) 0, then ( or, be) 2 + ( not, or not) 3 = 7 beats
    # ( or, or not) 4 + ( not, or not) 3 = 9: DTW on raw edit distances prefers the short token
    assert align_tokens(student, teacher) == [0, 2, 2, 3]


def test_mined_loss_matches_a_loop():
    torch.manual_seed(0)
    P, Vt, Vs, k, T = 5, 12, 7, 4, 2.0
    teacher_logprobs = torch.log_softmax(torch.randn(P, Vt) * 2, -1)
    student_logits = torch.randn(P, Vs)
    vocab_map = torch.tensor([0, 1, 1, 2, 3, -1, 4, 5, 6, 6, 0, 2])
    total = 0.0
    for p in range(P):
        ranked = sorted(range(Vt), key=lambda v: -float(teacher_logprobs[p, v]))[:k]
        mass = [0.0] * Vs
        for v in ranked:
            if vocab_map[v] >= 0:
                mass[int(vocab_map[v])] += math.exp(float(teacher_logprobs[p, v]))
        q = [m / sum(mass) for m in mass]
        q_t = [m ** (1 / T) if m > 0 else 0.0 for m in q]  # temperature on the mapped distribution
        q_t = [m / sum(q_t) for m in q_t]
        logp = torch.log_softmax(student_logits[p].double() / T, -1)
        total += sum(qq * (math.log(qq) - float(logp[i])) for i, qq in enumerate(q_t) if qq > 0) * T * T
        assert torch.allclose(mapped_teacher_logprobs(teacher_logprobs[p:p + 1], vocab_map, Vs, k).exp()[0],
                              torch.tensor(q, dtype=torch.float32), atol=1e-6)
    got = mined_loss(student_logits, teacher_logprobs, vocab_map, top_k=k, temperature=T)
    assert float(got) == pytest.approx(total / P, rel=1e-5)


# ------------------------------------------------------------------------------ alm
def test_alm_loss_matches_chunks_found_byte_by_byte():
    teacher = table_vocab(["to", " b", "e", " ", "or", " n", "ot", "t", "o", "b", "n", " be"])
    student = table_vocab(["t", "o b", "e o", "r", " not", " ", "o", "b", "e", "r", "n"])
    texts = ["to be or not", "not to be"]
    pair = PairTokenizer(teacher, student)
    examples = [pair(t) for t in texts]
    batch = collate(examples, K=4, teacher_bos=len(teacher.table) - 1, student_bos=len(student.table) - 1)
    torch.manual_seed(3)
    s_logits = torch.randn(*batch.student_labels.shape, len(student.table)) * 2
    t_logprobs = torch.log_softmax(torch.randn(*batch.teacher_input_ids.shape, len(teacher.table)) * 3, -1)
    tau = 0.7
    terms = []
    for b, ex in enumerate(examples):
        s_ends = [e for _, e in ex.student_spans]
        t_ends, pos = [], 0
        for t in ex.teacher_ids:
            pos += len(teacher.table[t])
            t_ends.append(pos)
        boundaries = sorted(set(s_ends) & set(t_ends))
        lo = 0
        for hi in boundaries:
            ls = sum(float(torch.log_softmax(s_logits[b, j].double(), -1)[ex.student_ids[j]])
                     for j, e in enumerate(s_ends) if lo < e <= hi)
            lt = sum(float(t_logprobs[b, k, ex.teacher_ids[k]]) for k, e in enumerate(t_ends) if lo < e <= hi)
            p, q = math.exp(lt / tau), math.exp(ls / tau)
            terms.append(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
            lo = hi
    assert len(terms) >= 4
    got = alm_loss(batch, s_logits, t_logprobs, temperature=tau)
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------ dskd
def test_dskd_terms_match_a_loop():
    torch.manual_seed(5)
    B, J, L, ds, dt, Vs, Vt, T = 2, 4, 5, 3, 4, 6, 7, 1.5
    proj = DualSpaceProjectors(ds, ds, dt, dt).double()
    s_hidden, t_hidden = torch.randn(B, J, ds, dtype=torch.double), torch.randn(B, L, dt, dtype=torch.double)
    s_logits = torch.randn(B, J, Vs, dtype=torch.double)
    s_in, s_out = torch.randn(B, J, ds, dtype=torch.double), torch.randn(B, J, ds, dtype=torch.double)
    t_in, t_out = torch.randn(B, L, dt, dtype=torch.double), torch.randn(B, L, dt, dtype=torch.double)
    w_s = torch.randn(Vs, ds, dtype=torch.double)
    t_head = torch.nn.Linear(dt, Vt, bias=False).double().requires_grad_(False)  # the teacher is frozen
    s_head = torch.nn.Linear(ds, Vs, bias=False).double()
    with torch.no_grad():
        s_head.weight.copy_(w_s)
    labels = torch.tensor([[1, 2, 3, -100], [4, 0, 5, 5]])
    t_mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    t_logprobs = torch.log_softmax(torch.randn(B, L, Vt, dtype=torch.double), -1)
    got = dskd_terms(proj, student_hidden=s_hidden, student_logits=s_logits, student_input_embeds=s_in,
                     student_target_embeds=s_out, student_head=s_head, student_labels=labels,
                     teacher_hidden=t_hidden, teacher_logprobs=t_logprobs, teacher_input_embeds=t_in,
                     teacher_target_embeds=t_out, teacher_mask=t_mask, teacher_head=t_head, temperature=T)

    def kl(logq, logits):  # KL(q || softmax(logits / T)) * T^2 with q re-tempered
        q = torch.softmax(logq / T, -1)
        return float((q * (torch.log(q) - torch.log_softmax(logits / T, -1))).sum()) * T * T

    keys = torch.cat([t_in, t_out], -1)
    keys = keys / keys[t_mask].std()
    values_t = t_hidden / t_hidden[t_mask].std()
    ce, kd_s, kd_t, n_ce, n_s, n_t = 0.0, 0.0, 0.0, 0, 0, 0
    with torch.no_grad():
        for b in range(B):
            rows = [k for k in range(L) if t_mask[b, k]]
            cols = [j for j in range(J) if labels[b, j] != -100]
            query = {j: proj.query(torch.cat([s_in[b, j], s_out[b, j]])) for j in cols}
            score = {(j, k): float(query[j] @ keys[b, k]) / math.sqrt(2 * dt) for j in cols for k in rows}
            for j in cols:
                w = torch.softmax(torch.tensor([score[j, k] for k in rows], dtype=torch.double), 0)
                h = sum(w[i] * proj.teacher_to_student(values_t[b, k]) for i, k in enumerate(rows))
                logits = w_s @ h
                ce -= float(torch.log_softmax(logits, -1)[labels[b, j]])
                n_ce += 1
                if int(logits.argmax()) == int(labels[b, j]):
                    kd_s += kl(torch.log_softmax(logits, -1), s_logits[b, j])
                    n_s += 1
            for k in rows:
                w = torch.softmax(torch.tensor([score[j, k] for j in cols], dtype=torch.double), 0)
                h = sum(w[i] * proj.student_to_teacher(s_hidden[b, j]) for i, j in enumerate(cols))
                kd_t += kl(t_logprobs[b, k], t_head(h))
                n_t += 1
    assert float(got["ce_t2s"].detach()) == pytest.approx(ce / n_ce, rel=1e-4)
    assert float(got["kd_teacher"].detach()) == pytest.approx(kd_t / n_t, rel=1e-4)
    assert float(got["kd_student"].detach()) == pytest.approx(kd_s / n_s if n_s else 0.0, rel=1e-4, abs=1e-9)
    assert float(got["t2s_accuracy"].detach()) == pytest.approx(n_s / n_ce)
    sum(v for k, v in got.items() if k != "t2s_accuracy").backward()
    assert s_head.weight.grad is None or not s_head.weight.grad.any()  # the heads stay as they are
    assert proj.teacher_to_student.weight.grad.abs().sum() > 0

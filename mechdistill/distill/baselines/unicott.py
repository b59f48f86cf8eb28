"""UniCoTT: structured explanations, node contrastive and structural-consistency losses.

Zhuang et al., "UniCoTT: A Unified Framework for Structural Chain-of-Thought Distillation", ICLR 2025
(openreview.net/forum?id=3baOKeI2EU). The teacher writes its explanation as a structure (chain, tree
or graph, "UniCoT"); each node is generated from the input, the gold answer and its parent nodes.
The student (an encoder classifier there) is trained jointly on the answer, a node-level supervised
contrastive loss (positives: nodes whose documents share the answer) and a structural-consistency
loss on the relation-weighted node representations. Reported: weight 0.5 on the contrastive loss,
0.2 on the structural loss, a 7-node tree.

As implemented (one document per item; H [n, d]: the item's node representations, each the mean
last hidden state over the node's tokens, `recipe.span_means`):

    loss      = CE + w_con * L_con + w_struct * (L_var + L_cov)
    CE        = -1/|S| sum_{i in S} log p(x_i | x_<i), S the node and answer-block tokens
    L_con     SupCon (Khosla et al. 2020, "L_out") over the item's nodes and the nodes of n_negatives
              other documents, z_i = h_i / |h_i|:
              L_con = 1/|A| sum_{i in A} -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )
              P(i): the other nodes whose document shares a gold label with i's (the item's own nodes
              are positives of each other); A: the nodes with at least one positive
    G         = A_norm H, A_norm = D^-1/2 (R + I) D^-1/2, R the node adjacency (R_kp = R_pk = 1 when p is
              a parent of k), D its row sums: each node mixed with its neighbours
    L_var     = 1/d sum_j max(0, gamma - sqrt(Var_k(G_kj) + 1e-4))        (VICReg variance, unbiased Var)
    L_cov     = 1/d sum_{j != l} C_jl^2, C = 1/(n-1) (G - mean G)^T (G - mean G)   (VICReg covariance)
              L_var = L_cov = 0 for a one-node structure

Structures (`teacher_data`, one row per doc_id x node: doc_id, node, parents, text):

    chain     the teacher's greedy CoT cut into its sentences and lines (text.sentence_spans),
              consecutive ones grouped evenly into at most max_nodes steps; parents = [previous node];
              no teacher call
    tree      7 nodes: a root (the area of the document the gold labels belong to), 2 children of it,
              2 children of each (one on the document's evidence, one on why the labels fit rather than
              similar ones); one teacher call per node, level by level (one batch over all documents)
    graph     the tree's 7 nodes as a DAG: the middle two leaves (4, 5) read both level-1 nodes, so the
              two branches merge

Adapted here:
- The student is a causal LM, not an encoder classifier: it is taught the structure as text (the
  prompt, then the node texts separated by newlines, then the teacher's greedy answer block) with CE
  over nodes and answer, in place of the classifier's answer loss; it generates its CoT as vanilla does.
- Node representations: the mean last hidden state over each node's tokens (not checked how the
  original pools them).
- Negatives (`n_negatives`): with one document per step, each item carries the prompt + node tokens of
  n_negatives other documents of its split, chosen with `seed`, documents sharing no gold label with it
  first. Their node representations are computed in the same loss call WITHOUT grad (fixed keys, as in
  a memory bank; each costs a forward without backward); the original contrasts within a batch.
- `structure`: chain in the demo (no teacher call); the paper's main setting is the 7-node tree.
- Relation weights: 1 per parent-child edge, symmetrically normalised with self-loops (not checked:
  the original's relation weighting).
- `var_target` (gamma) 1.0 and the 1e-4 in the square root are VICReg's; L_var and L_cov weigh
  equally inside w_struct (not checked; VICReg weighs them 25 : 1).
- `temperature` 0.1 (not checked; SupCon's own paper uses 0.1).
- `node_max_tokens` and the node prompts' wording are choices of this repository.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...io import SplitArtifacts
from ...models import input_device
from ...teacher.answers import end_of_turn, supervised_output
from ...text import sentence_spans
from ..catalog import BASELINES
from ..recipe import Item, RecipeContext, TeacherDataContext, baseline_recipe
from .causal_lm import cot_terms, encode, forward, next_token_ce, span_means

log = logging.getLogger(__name__)

VAR_EPS = 1e-4  # VICReg's epsilon inside the square root

ROOT = "Name the broad area of the document that these labels belong to."
EVIDENCE = "Give the evidence in the document that supports these labels."
CONTRAST = "Explain why these labels fit the document better than similar labels."
# structure -> (parents, instruction) of each node, parents before children
STRUCTURES: dict[str, list[tuple[tuple[int, ...], str]]] = {
    "tree": [((), ROOT), ((0,), EVIDENCE), ((0,), CONTRAST),
             ((1,), EVIDENCE), ((1,), CONTRAST), ((2,), EVIDENCE), ((2,), CONTRAST)],
    "graph": [((), ROOT), ((0,), EVIDENCE), ((0,), CONTRAST),
              ((1,), EVIDENCE), ((1, 2), CONTRAST), ((1, 2), EVIDENCE), ((2,), CONTRAST)],
}


# ----------------------------------------------------------------------------- teacher data


def chain_steps(cot: str, max_nodes: int) -> list[str]:
    """The CoT cut into at most `max_nodes` steps: its sentences and lines, consecutive ones grouped
    evenly when there are more (each step the CoT text from its first sentence to its last)."""
    spans = sentence_spans(cot)
    n = min(len(spans), max_nodes)
    if n == 0:
        return []
    bounds = [round(i * len(spans) / n) for i in range(n + 1)]
    return [cot[spans[a][0]:spans[b - 1][1]] for a, b in zip(bounds, bounds[1:])]


def chain_frame(split: SplitArtifacts, max_nodes: int) -> pd.DataFrame:
    """The chain structure of every document with a CoT: rows doc_id, node, parents, text."""
    rows = []
    for doc_id in split.anchors["doc_id"]:
        cot = split.cot.loc[doc_id, "cot"] if doc_id in split.cot.index else ""
        for k, text in enumerate(chain_steps(cot, max_nodes)):
            rows.append({"doc_id": doc_id, "node": k, "parents": [k - 1] if k else [], "text": text})
    return pd.DataFrame(rows, columns=["doc_id", "node", "parents", "text"])


def node_prompt(document: str, gold_titles: Sequence[str], parent_texts: Sequence[str], instruction: str) -> str:
    """The teacher's prompt for one node: the document, the gold answer, its parents' texts."""
    parts = [f"Document:\n{document}", "Correct labels:\n" + "\n".join(f"- {t}" for t in gold_titles)]
    if parent_texts:
        parts.append("Reasoning so far:\n" + "\n".join(f"- {t}" for t in parent_texts))
    parts.append(f"{instruction} Answer in one or two sentences.")
    return "\n\n".join(parts)


def node_levels(spec: Sequence[tuple[tuple[int, ...], str]]) -> list[list[int]]:
    """Nodes grouped by depth (a node one deeper than its deepest parent)."""
    depth: list[int] = []
    for parents, _ in spec:
        depth.append(1 + max(depth[p] for p in parents) if parents else 0)
    return [[k for k, d in enumerate(depth) if d == level] for level in range(max(depth) + 1)]


def structured_frame(ctx: TeacherDataContext) -> pd.DataFrame:
    """A tree or graph per document, generated by the teacher level by level (one batch per level)."""
    spec, split = STRUCTURES[ctx.params["structure"]], ctx.split
    doc_ids = list(split.anchors["doc_id"])
    texts: dict[tuple[str, int], str] = {}
    for level in node_levels(spec):
        keys = [(d, k) for d in doc_ids for k in level]
        prompts = [ctx.render([{"role": "user", "content": node_prompt(
            split.docs.loc[d, "text"], gold_titles(split, d), [texts[d, p] for p in spec[k][0]], spec[k][1])}])
            for d, k in keys]
        outputs = ctx.generate(prompts, max_new_tokens=ctx.params["node_max_tokens"], temperature=0.0, seed=ctx.seed)
        texts.update({key: out.strip() for key, out in zip(keys, outputs)})
    empty = sum(not t for t in texts.values())
    if empty:
        log.warning("%s: %d of %d generated nodes are empty", ctx.split_name, empty, len(texts))
    return pd.DataFrame([{"doc_id": d, "node": k, "parents": list(spec[k][0]), "text": texts[d, k]}
                         for d in doc_ids for k in range(len(spec))])


def teacher_data(ctx: TeacherDataContext) -> pd.DataFrame:
    """The structured explanation of every document of the split (params["structure"])."""
    structure = ctx.params["structure"]
    if structure == "chain":
        return chain_frame(ctx.split, ctx.params["max_nodes"])
    if structure not in STRUCTURES:
        raise ValueError(f"unicott: unknown structure {structure!r}; known: chain, {', '.join(STRUCTURES)}")
    return structured_frame(ctx)


def gold_titles(split: SplitArtifacts, doc_id: str) -> list[str]:
    return [split.space.title.get(g, g) for g in split.docs.loc[doc_id, "labels"]]


# ----------------------------------------------------------------------------- items


def answer_block(tokenizer, cot: str, raw: str | None) -> str:
    """What follows the CoT in the teacher's supervised output: "\\n<answer>...</answer>" and `tokenizer`'s
    end of turn, or ""."""
    return supervised_output(cot, raw, end_of_turn(tokenizer))[len(cot):]


def node_pieces(texts: Sequence[str]) -> list[tuple[str, str]]:
    """encode's pieces of the node texts, newline-separated: node0, sep0, node1, ..."""
    pieces = []
    for k, text in enumerate(texts):
        pieces += [(f"sep{k - 1}", "\n")] if k else []
        pieces.append((f"node{k}", text))
    return pieces


def adjacency(parents: Sequence[Sequence[int]]) -> Tensor:
    """Symmetric node relation matrix R [n, n]: 1 between each node and each of its parents."""
    rel = torch.zeros(len(parents), len(parents))
    for k, ps in enumerate(parents):
        for p in ps:
            rel[k, p] = rel[p, k] = 1.0
    return rel


def choose_negatives(doc_id: str, pool: Sequence[str], gold: Mapping[str, set], n: int, seed: int) -> list[str]:
    """n other documents of the pool, shuffled with (seed, doc_id), those sharing no gold label first."""
    others = [d for d in pool if d != doc_id]
    random.Random(f"{seed}:{doc_id}").shuffle(others)
    others.sort(key=lambda d: bool(gold[d] & gold[doc_id]))  # stable: label-disjoint documents first
    return others[:n]


def items(ctx: RecipeContext) -> list[Item]:
    """Per document with a CoT and nodes: prompt + nodes + the teacher's answer block, CE on all but the
    prompt; spans["nodes"]; extra: relation matrix, negatives' prompt + node tokens, label sharing."""
    split, params = ctx.split, ctx.params
    nodes = ctx.teacher_data if ctx.teacher_data is not None else chain_frame(split, params["max_nodes"])
    by_doc = {d: g.sort_values("node") for d, g in nodes.groupby("doc_id")}
    usable, skipped = [], []
    for d in split.anchors["doc_id"]:
        has_cot = d in split.cot.index and bool(split.cot.loc[d, "cot"].strip())
        (usable if has_cot and d in by_doc else skipped).append(d)
    if skipped:
        log.warning("%s: %d documents without a CoT or nodes are skipped: %s", split.source, len(skipped), skipped[:5])
    encoded = {}
    for d in usable:
        texts = list(by_doc[d]["text"])
        raw = split.cot.loc[d, "raw"] if "raw" in split.cot.columns else None
        ids, supervised, spans = encode(ctx.tokenizer, split.prompts.loc[d, "messages"],
                                        node_pieces(texts) + [("answer", answer_block(ctx.tokenizer, split.cot.loc[d, "cot"], raw))])
        encoded[d] = (ids, supervised, [spans[f"node{k}"] for k in range(len(texts))])
    gold = {d: set(split.docs.loc[d, "labels"]) for d in usable}
    out = []
    for d in usable:
        ids, supervised, node_spans = encoded[d]
        negatives = choose_negatives(d, usable, gold, params["n_negatives"], ctx.seed)
        group = [d, *negatives]
        shares = torch.tensor([[bool(gold[a] & gold[b]) for b in group] for a in group])  # [1+m, 1+m]
        out.append(Item(
            doc_id=d, input_ids=ids, supervised=supervised, spans={"nodes": node_spans},
            extra={"relation": adjacency(list(by_doc[d]["parents"])),
                   # causal LM: a prefix up to the last node gives the same node states as the whole sequence
                   "negative_ids": [encoded[n][0][:encoded[n][2][-1][1]] for n in negatives],
                   "negative_spans": [encoded[n][2] for n in negatives], "shares_label": shares},
            record={"structure": params["structure"], "n_nodes": len(node_spans), "negatives": negatives,
                    "n_negatives_sharing_label": int(shares[0, 1:].sum())}))
    return out


# ----------------------------------------------------------------------------- losses


def supcon(reps: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (L_con above): reps [n, d], positives [n, n] bool, diagonal False.
    0 (with grad) when no node has a positive."""
    z = F.normalize(reps, dim=-1)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = (z @ z.T / temperature).masked_fill(eye, float("-inf")).log_softmax(-1)  # [n, n]
    anchors = positives.any(-1)
    if not anchors.any():
        return reps.sum() * 0.0
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(-1) / positives.sum(-1).clamp(min=1)
    return per_anchor[anchors].mean()


def relation_weighted(h: Tensor, relation: Tensor) -> Tensor:
    """G = D^-1/2 (R + I) D^-1/2 H: h [n, d], relation [n, n] -> [n, d]."""
    a = relation.to(h) + torch.eye(len(h), dtype=h.dtype, device=h.device)
    deg = a.sum(-1)
    return a / (deg[:, None] * deg[None, :]).sqrt() @ h


def variance_term(g: Tensor, target: float) -> Tensor:
    """L_var = mean_j max(0, target - sqrt(Var_k g[k, j] + eps)): g [n, d]; 0 for n < 2."""
    if len(g) < 2:
        return g.sum() * 0.0
    return F.relu(target - (g.var(0) + VAR_EPS).sqrt()).mean()


def covariance_term(g: Tensor) -> Tensor:
    """L_cov = 1/d sum_{j != l} Cov(g)[j, l]^2: g [n, d]; 0 for n < 2."""
    if len(g) < 2:
        return g.sum() * 0.0
    centred = g - g.mean(0)
    cov = centred.T @ centred / (len(g) - 1)                                   # [d, d]
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / g.shape[1]


@torch.no_grad()
def negative_node_reps(model: nn.Module, item: Item) -> list[Tensor]:
    """Node representations [n_j, d] of each negative document, without grad (no logits but the last)."""
    reps = []
    for ids, spans in zip(item.extra["negative_ids"], item.extra["negative_spans"]):
        out = model(input_ids=ids[None].to(input_device(model)), output_hidden_states=True, use_cache=False,
                    logits_to_keep=1)
        reps.append(span_means(out.hidden_states[-1], spans).float())
    return reps


def node_positives(sizes: Sequence[int], shares_label: Tensor) -> Tensor:
    """[N, N] bool over all nodes (item's, then each negative's): documents share a gold label, i != j."""
    doc = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # [N] document of each node
    return shares_label[doc][:, doc] & ~torch.eye(len(doc), dtype=torch.bool)


def loss(model: nn.Module, item: Item, params: Mapping[str, Any]) -> dict[str, Tensor]:
    """CE + w_con * L_con + w_struct * (L_var + L_cov) on one item (module docstring)."""
    logits, hidden = forward(model, item.input_ids, hidden=True)
    ce = next_token_ce(logits, item.input_ids, item.supervised)
    h = span_means(hidden, item.spans["nodes"]).float()                       # [n, d]
    negatives = [r.to(h.device) for r in negative_node_reps(model, item)]
    sizes = [len(h)] + [len(r) for r in negatives]
    positives = node_positives(sizes, item.extra["shares_label"]).to(h.device)
    con = supcon(torch.cat([h, *negatives]), positives, params["temperature"])
    g = relation_weighted(h, item.extra["relation"])
    var, cov = variance_term(g, params["var_target"]), covariance_term(g)
    total = ce + params["w_con"] * con + params["w_struct"] * (var + cov)
    return {"loss": total, **cot_terms(ce.detach()), "unicott.con": con.detach(), "unicott.var": var.detach(),
            "unicott.cov": cov.detach()}


RECIPE = baseline_recipe(BASELINES["unicott"], items=items, loss=loss, teacher_data=teacher_data)

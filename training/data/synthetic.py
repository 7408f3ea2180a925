"""A click simulator with known ground truth (docs/simulator.md).

Users with drifting interests browse items (the behaviour log); the ranking stage retrieves a
mix of relevant and random candidates and orders them by a noisy, stale relevance score; clicks
on the displayed order follow a position-bias model with item-to-item effects (same category:
redundancy, complementary categories: a boost). A logging policy picks the order each list was
shown in (``LoggingPolicy``), so the logs hold clicks under many orders. Because clicks are
independent given the order, the expected number of clicks of ANY permutation is exact and cheap:
``ClickModel.expected_utility``.

Everything is vectorised numpy generated in chunks, with a cost independent of the catalogue size
(about 15 s of CPU per 200k lists of 20), so millions of lists are practical.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from export.contract.schema import (
    RANK_SCORE,
    CategoricalFeature,
    FeatureSchema,
    NumericFeature,
    Vocab,
    Vocabularies,
    read_json,
)
from training.data.store import SHOWN_POSITION, SPLITS, DataError, ListData, staged, write_dataset
from training.metrics import valid_first

SIMULATOR_VERSION = 1
ACTIONS = ("view", "click")
START = 1_704_067_200  # 2024-01-01 00:00 UTC: lists start here, behaviours a warm-up earlier
DAY = 86_400
CHUNK_CELLS = 1 << 20  # rows x width per chunk: bounds memory
FEED = 32  # items a user sees when browsing; a behaviour picks one of them
RETRIEVAL_POOL = 100  # random items the retrieval stage scores for the relevant candidates
LOGGING_POLICIES = ("initial", "shuffle", "plackett-luce")
DEFAULT_LOGGING_POLICY = "plackett-luce"  # docs/simulator.md#logging-policy says why
DEFAULT_TEMPERATURE = 1.0
MAX_CONTENT_DIM = 1024
VAL_CUT, TEST_CUT = 0.8, 0.9  # shares of lists (by time) before the val and the test split


@dataclass(frozen=True)
class ClickModel:
    """P(click at rank r) = sigmoid(attraction_i + position_bias(r) + sum_{j above i} k(r_i - r_j) M[c_i, c_j]).

    position_bias(r) = -position_decay * ln(1 + r); k(d) = neighbour_decay^(d - 1);
    M[c, c] = -redundancy, M[c, partner(c)] = +complement (partner(c) = c xor 1), 0 otherwise.
    """

    n_categories: int = 20
    position_decay: float = 0.5
    redundancy: float = 0.7
    complement: float = 0.5
    neighbour_decay: float = 0.7

    def __post_init__(self) -> None:
        if self.n_categories < 1:
            raise ValueError(f"ClickModel.n_categories must be >= 1, got {self.n_categories}")
        if not 0.0 <= self.neighbour_decay < 1.0:
            raise ValueError(f"ClickModel.neighbour_decay must be in [0, 1), got {self.neighbour_decay}")
        if self.position_decay < 0:
            raise ValueError(f"ClickModel.position_decay must be >= 0, got {self.position_decay}")

    def interaction(self) -> np.ndarray:
        """M [C, C]: effect of category c_j shown above on category c_i's click logit."""
        cats = np.arange(self.n_categories)
        partner = cats ^ 1
        m = np.zeros((self.n_categories, self.n_categories))
        paired = partner < self.n_categories
        m[cats[paired], partner[paired]] = self.complement
        m[cats, cats] = -self.redundancy
        return m

    def position_bias(self, length: int) -> np.ndarray:
        return -self.position_decay * np.log1p(np.arange(length))

    def kernel(self, length: int) -> np.ndarray:
        """K [L, L]: K[r, s] = neighbour_decay^(r - s - 1) for s < r (s shown above r), else 0."""
        d = np.arange(length)[:, None] - np.arange(length)[None, :]
        return np.where(d > 0, self.neighbour_decay ** np.maximum(d - 1, 0), 0.0)

    def click_probabilities(
        self, attraction: np.ndarray, category: np.ndarray, mask: np.ndarray, perm: np.ndarray
    ) -> np.ndarray:
        """P(click) of each candidate (indexed as in the list, 0 when padded) when shown in order ``perm``."""
        mask = np.asarray(mask, dtype=bool)
        perm = valid_first(perm, mask)
        shown = np.take_along_axis(mask, perm, axis=1)
        a = np.take_along_axis(np.asarray(attraction, dtype=np.float64), perm, axis=1)
        c = np.take_along_axis(np.asarray(category), perm, axis=1).astype(np.int64)
        if (shown & ((c < 0) | (c >= self.n_categories))).any():
            raise ValueError(f"category values must lie in 0..{self.n_categories - 1} for real candidates")
        c = np.where(shown, c, 0)
        length = perm.shape[1]
        pair = self.interaction()[c[:, :, None], c[:, None, :]]  # [B, i, j]
        context = np.einsum("bij,ij,bj->bi", pair, self.kernel(length), shown.astype(np.float64))
        p_shown = np.where(shown, 1.0 / (1.0 + np.exp(-(a + self.position_bias(length) + context))), 0.0)
        p = np.zeros_like(p_shown)
        np.put_along_axis(p, perm, p_shown, axis=1)
        return p

    def expected_utility(self, data: ListData, perm: np.ndarray) -> np.ndarray:
        """Exact expected number of clicks of each list shown in order ``perm`` (float64 [B])."""
        attraction, category, mask = self.list_arrays(data)
        rows = max(1, CHUNK_CELLS // max(1, mask.shape[1] ** 2))
        return np.concatenate(
            [
                self.click_probabilities(attraction[s], category[s], mask[s], perm[s]).sum(axis=1)
                for s in (slice(i, i + rows) for i in range(0, max(len(mask), 1), rows))
            ]
        )

    def context_clicks(self, data: ListData, perm: np.ndarray) -> np.ndarray:
        """Expected clicks each list earns from what its items are shown next to (float64 [B]):
        expected_utility minus the same order's with no item-to-item effects. Negative when redundant
        items sit close together; comparing two orders' values tells how much of their difference in
        expected clicks is list context."""
        plain = replace(self, redundancy=0.0, complement=0.0)
        return self.expected_utility(data, perm) - plain.expected_utility(data, perm)

    def sample_clicks(
        self,
        attraction: np.ndarray,
        category: np.ndarray,
        mask: np.ndarray,
        perm: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """One draw of clicks (0/1 float32, indexed as in the list) for the order ``perm``."""
        p = self.click_probabilities(attraction, category, mask, perm)
        return (rng.random(p.shape) < p).astype(np.float32)

    def greedy_permutation(self, data: ListData) -> np.ndarray:
        """A strong reference order: at each rank, place the candidate with the highest click chance there.

        It knows the true attractions, so it is an upper reference for rerankers (not the exact optimum).
        """
        attraction, category, mask = self.list_arrays(data)
        n, length = mask.shape
        c = np.where(mask, category, 0).astype(np.int64)
        m = self.interaction()
        rows = np.arange(n)
        context = np.zeros((n, length))
        placed = np.zeros((n, length), dtype=bool)
        perm = np.zeros((n, length), dtype=np.int64)
        for r in range(length):
            # real candidates by click logit, then padded ones (so each row stays a permutation)
            key = np.where(placed, -np.inf, np.where(mask, attraction + context, -1e300))
            pick = np.argmax(key, axis=1)
            perm[:, r] = pick
            placed[rows, pick] = True
            context = self.neighbour_decay * context + m[c, c[rows, pick][:, None]]
        return perm

    @staticmethod
    def list_arrays(data: ListData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        missing = [k for k in ("attraction", "category") if k not in data.extras]
        if missing:
            raise DataError(f"list data lacks simulator column(s) {missing}: only synthetic data sets carry them")
        return data.extras["attraction"], data.extras["category"], data.inputs["cand_mask"]

    def save(
        self, data_dir: Path, world: dict[str, np.ndarray], config: SimulatorConfig, policy: LoggingPolicy
    ) -> None:
        meta = {"version": SIMULATOR_VERSION, "click_model": asdict(self), "world": asdict(config), **policy.describe()}
        (Path(data_dir) / "simulator.json").write_text(json.dumps(meta, indent=2))
        np.savez_compressed(Path(data_dir) / "simulator.npz", interaction=self.interaction(), **world)

    @classmethod
    def load(cls, data_dir: Path) -> ClickModel:
        path = Path(data_dir) / "simulator.json"
        meta = read_json(
            path,
            missing="not found; only `psad data build synthetic` data sets have a click model",
            error=DataError,
            fix="; rebuild the data set",
        )
        if not isinstance(meta, dict) or meta.get("version") != SIMULATOR_VERSION:
            version = meta.get("version") if isinstance(meta, dict) else None
            raise DataError(f"{path}: version {version!r}, this release reads {SIMULATOR_VERSION}; rebuild it")
        try:
            return cls(**meta["click_model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: malformed simulator parameters ({exc}); rebuild the data set") from None


@dataclass(frozen=True)
class LoggingPolicy:
    """Which order each logged list was shown in; clicks are drawn under it.

    initial: the ranking stage's order. shuffle: uniformly random. plackett-luce: sampled without
    replacement from softmax(rank_score / temperature), so exploration stays near the ranking stage's
    order at low temperature. Orders come from their own random stream, so for one seed every policy
    logs the same lists (and ``initial`` the same data as before policies existed).
    """

    name: str | None = None  # None: DEFAULT_LOGGING_POLICY
    temperature: float | None = None  # plackett-luce only; None: DEFAULT_TEMPERATURE

    def __post_init__(self) -> None:
        if self.name is None:
            object.__setattr__(self, "name", DEFAULT_LOGGING_POLICY)
        if self.name not in LOGGING_POLICIES:
            raise DataError(
                f"synthetic: --logging-policy must be one of {'|'.join(LOGGING_POLICIES)}, got {self.name!r}"
            )
        if self.name != "plackett-luce":
            if self.temperature is not None:
                raise DataError(
                    f"synthetic: --temperature applies only to --logging-policy plackett-luce, not {self.name!r}; "
                    "drop --temperature or use plackett-luce"
                )
            return
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else float(self.temperature)
        if not (np.isfinite(temperature) and temperature > 0):
            raise DataError(f"synthetic: --temperature must be a finite number > 0, got {self.temperature}")
        object.__setattr__(self, "temperature", temperature)

    def orders(self, rank_score: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """perm [n, L] (int64): perm[b, r] = stored index of the candidate shown at rank r of list b.

        ``rank_score`` must be in stored (descending) order, so that ``initial`` is the identity.
        """
        n, length = rank_score.shape
        if self.name == "initial":
            return np.broadcast_to(np.arange(length), (n, length))
        if self.name == "shuffle":
            return np.argsort(rng.random((n, length)), axis=1)
        return np.argsort(-(rank_score / self.temperature + _gumbel(rng, (n, length))), axis=1, kind="stable")

    def describe(self) -> dict:
        """Provenance for stats.json, simulator.json and the schema's extra: how the data set was logged."""
        return {"logging_policy": self.name, "temperature": self.temperature}


@dataclass(frozen=True)
class SimulatorConfig:
    """How the world is drawn (docs/simulator.md has the formulas)."""

    dim: int = 16  # latent dimension of users and items
    n_segments: int = 5  # user segments (a categorical user feature that shapes the base interest)
    bias: float = -2.0  # alpha: base click logit
    affinity_scale: float = 4.0  # beta: weight of <interest(t), item vector>
    quality_weight: float = 0.5  # gamma: weight of the item's true quality
    drift: float = 1.0  # rho: size of the rotating drift component relative to the base interest
    drift_period_days: tuple[float, float] = (120.0, 480.0)  # one drift rotation takes this long
    span_days: float = 180.0  # lists are spread over this period
    warmup_days: float = 60.0  # behaviours start this much earlier, so early lists have histories
    relevant_fraction: float = 0.6  # share of candidates retrieved by current interest (rest: random)
    rank_noise: float = 0.5  # noise of the ranking stage's score
    quality_noise: float = 0.5  # noise of the observed quality feature
    behaviours_per_user: float = 4.0  # mean log size per user, in units of max(max_history, 10)
    content_dim: int = 0  # D: item numeric features content_0..content_{D-1}, declared as the items' content
    content_noise: float = 0.5  # std of the Gaussian noise on each content feature (the signal's is about 1)
    cold_items: float = 0.0  # share of items introduced at the train/val cut: in no training list or earlier log

    def check(self, items: int, list_length: int) -> None:
        """The content and cold-item settings, against the catalogue they apply to."""
        rules = [
            (
                0 <= self.content_dim <= MAX_CONTENT_DIM,
                f"--content-dim must be in 0..{MAX_CONTENT_DIM}, got {self.content_dim}",
            ),
            (
                bool(np.isfinite(self.content_noise)) and self.content_noise >= 0,
                f"--content-noise must be a finite number >= 0, got {self.content_noise}",
            ),
            (0 <= self.cold_items < 1, f"--cold-items must be a share in [0, 1), got {self.cold_items}"),
        ]
        for ok, message in rules:
            if not ok:
                raise DataError(f"synthetic: {message}")
        cold = self.n_cold(items)
        if self.cold_items > 0 and cold == 0:
            raise DataError(
                f"synthetic: --cold-items {self.cold_items} of {items} items is no item; raise --cold-items or --items"
            )
        if items - cold < list_length:
            raise DataError(
                f"synthetic: --cold-items {self.cold_items} leaves {items - cold} items for the training period, "
                f"fewer than --list-length ({list_length}); lower --cold-items or raise --items"
            )

    def n_cold(self, items: int) -> int:
        return int(round(self.cold_items * items))


class World:
    """The ground truth: latent vectors, categories and drifting user interests."""

    def __init__(self, cfg: SimulatorConfig, n_categories: int, users: int, items: int, rng: np.random.Generator):
        def unit(x: np.ndarray) -> np.ndarray:
            return x / np.linalg.norm(x, axis=-1, keepdims=True)

        d = cfg.dim
        self.cfg = cfg
        self.item_category = rng.integers(n_categories, size=items)
        self.item_vec = unit(
            unit(rng.standard_normal((n_categories, d)))[self.item_category]
            + 0.7 * rng.standard_normal((items, d)) / np.sqrt(d)
        ).astype(np.float32)
        self.item_quality = rng.standard_normal(items).astype(np.float32)
        self.item_quality_obs = (self.item_quality + cfg.quality_noise * rng.standard_normal(items)).astype(np.float32)
        self.user_segment = rng.integers(cfg.n_segments, size=users)
        segment_vec = unit(rng.standard_normal((cfg.n_segments, d)))
        self.user_base = unit(segment_vec[self.user_segment] + rng.standard_normal((users, d)) / np.sqrt(d))
        d1 = unit(rng.standard_normal((users, d)))
        d2 = rng.standard_normal((users, d))
        d2 = unit(d2 - (d2 * d1).sum(axis=1, keepdims=True) * d1)
        self.user_drift = np.stack([d1, d2], axis=1)  # [U, 2, D]
        self.user_omega = 2 * np.pi / rng.uniform(*cfg.drift_period_days, size=users)  # radians per day
        self.user_phase = rng.uniform(0, 2 * np.pi, size=users)
        activity = rng.lognormal(0.0, 0.75, size=users)
        self.user_activity = activity / activity.mean()

    def interest(self, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """z_u(t) = normalise(base_u + rho (cos theta d1_u + sin theta d2_u)), theta = phase_u + omega_u t."""
        theta = self.user_phase[user] + self.user_omega[user] * (ts - START) / DAY
        rot = np.stack([np.cos(theta), np.sin(theta)], axis=1)[:, :, None]
        z = self.user_base[user] + self.cfg.drift * (rot * self.user_drift[user]).sum(axis=1)
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)

    def relevance(self, user: np.ndarray, ts: np.ndarray, item: np.ndarray) -> np.ndarray:
        """beta <z_u(t), v_i> + gamma q_i (the click logit without bias) of items [n, K]: float32 [n, K]."""
        affinity = np.einsum("nd,nkd->nk", self.interest(user, ts), self.item_vec[item])
        return self.cfg.affinity_scale * affinity + self.cfg.quality_weight * self.item_quality[item]

    def content(self, dim: int, noise: float, rng: np.random.Generator) -> np.ndarray:
        """Noisy content vectors [items, dim]: a fixed random projection of what drives relevance, plus noise.

        Relevance is beta <z, v_i> + gamma q_i = beta <(z, 1), x_i> with x_i = (v_i, gamma / beta q_i), so
        x_i is what a content-based encoder needs to recover; each feature's signal has variance ~|x_i|^2 ~ 1.
        """
        cfg = self.cfg
        latent = np.concatenate(
            [self.item_vec, (cfg.quality_weight / cfg.affinity_scale) * self.item_quality[:, None]], axis=1
        )
        projection = rng.standard_normal((latent.shape[1], dim))
        return (latent @ projection + noise * rng.standard_normal((len(latent), dim))).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        names = (
            "item_category",
            "item_vec",
            "item_quality",
            "item_quality_obs",
            "user_segment",
            "user_base",
            "user_drift",
            "user_omega",
            "user_phase",
            "user_activity",
        )
        return {name: getattr(self, name) for name in names}


def _check_arguments(lists: int, users: int, items: int, list_length: int, max_history: int, seed: int) -> None:
    rules = [
        (lists >= 30, f"--lists must be >= 30 so train/val/test (80/10/10 by time) are not empty, got {lists}"),
        (users >= 1, f"--users must be >= 1, got {users}"),
        (list_length >= 2, f"--list-length must be >= 2 (a list of one needs no reranking), got {list_length}"),
        (
            items >= list_length,
            f"--items ({items}) must be >= --list-length ({list_length}): candidates are "
            "distinct items; raise --items or lower --list-length",
        ),
        (max_history >= 0, f"--max-history must be >= 0, got {max_history}"),
        (seed >= 0, f"--seed must be >= 0, got {seed}"),
    ]
    for ok, message in rules:
        if not ok:
            raise DataError(f"synthetic: {message}")


def _chunks(total: int, width: int, desc: str, progress: bool):
    rows = max(64, CHUNK_CELLS // width)
    with tqdm(total=total, desc=desc, unit=desc, disable=not progress, leave=False) as bar:
        for start in range(0, total, rows):
            stop = min(total, start + rows)
            yield slice(start, stop)
            bar.update(stop - start)


def _gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gumbel noise: argmax / top-k of (logits + noise) samples from softmax(logits) without replacement."""
    return -np.log(rng.standard_exponential(shape, dtype=np.float32) + np.finfo(np.float32).tiny)


def _distinct(rng: np.random.Generator, n: int, k: int, items: int) -> np.ndarray:
    """k distinct random items per row, int64 [n, k]: uniform subsets, cost independent of the catalogue."""
    if 2 * k > items:
        return np.argsort(rng.random((n, items)), axis=1)[:, :k]
    draw = rng.integers(items, size=(n, k))
    rows = np.arange(n)
    while len(rows):  # redraw the later copies of repeated items; ends fast since k <= items / 2
        sub = draw[rows]
        order = np.argsort(sub, axis=1, kind="stable")
        ranked = np.take_along_axis(sub, order, axis=1)
        repeat = np.zeros_like(sub, dtype=bool)
        repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
        np.put_along_axis(repeat, order, repeat.copy(), axis=1)
        sub[repeat] = rng.integers(items, size=int(repeat.sum()))
        draw[rows] = sub
        rows = rows[repeat.any(axis=1)]
    return draw


def _behaviours(world: World, n_per_user: float, rng: np.random.Generator, progress: bool):
    """Organic browsing: from a feed of FEED random items the user opens one, drawn from softmax(relevance
    at the time); the behaviour is a click with P = sigmoid(bias + relevance), otherwise a view."""
    cfg = world.cfg
    counts = rng.poisson(world.user_activity * n_per_user)
    user = np.repeat(np.arange(len(counts)), counts)
    ts = rng.integers(START - int(cfg.warmup_days * DAY), START + int(cfg.span_days * DAY), size=len(user))
    order = np.lexsort((ts, user))
    user, ts = user[order], ts[order]
    item = np.empty(len(user), dtype=np.int64)
    click = np.empty(len(user), dtype=bool)
    for s in _chunks(len(user), FEED, "behaviours", progress):
        item[s], click[s] = _browse(world, user[s], ts[s], len(world.item_vec), rng)
    return user, ts, item, click


def _browse(
    world: World, user: np.ndarray, ts: np.ndarray, n_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One behaviour per row from a feed of the first `n_items` items: (item, whether it was a click)."""
    feed = rng.integers(n_items, size=(len(user), FEED))
    rel = world.relevance(user, ts, feed)
    pick = np.argmax(rel + _gumbel(rng, rel.shape), axis=1)[:, None]
    logit = world.cfg.bias + np.take_along_axis(rel, pick, axis=1)[:, 0]
    return np.take_along_axis(feed, pick, axis=1)[:, 0], rng.random(len(logit)) < 1 / (1 + np.exp(-logit))


def _rebrowse_before(
    world: World,
    log: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    known: int,
    cut: int,
    rng: np.random.Generator,
    progress: bool,
) -> None:
    """Redraw in place, from a feed of the known items only, each behaviour on a cold item (index >= known)
    before `cut`: cold items are not in the catalogue yet. Times and users stay, so the log stays sorted."""
    user, ts, item, click = log
    redo = np.flatnonzero((item >= known) & (ts < cut))
    for s in _chunks(len(redo), FEED, "cold behaviours", progress):
        rows = redo[s]
        item[rows], click[rows] = _browse(world, user[rows], ts[rows], known, rng)


def _cuts(ts: np.ndarray) -> np.ndarray:
    """The val and test cuts (timestamps) of time-sorted list timestamps: 80 / 10 / 10 by list."""
    return ts[[int(VAL_CUT * len(ts)), int(TEST_CUT * len(ts))]]


def _lists(
    world: World,
    model: ClickModel,
    policy: LoggingPolicy,
    n: int,
    length: int,
    rngs: tuple[np.random.Generator, np.random.Generator, np.random.Generator],
    known: int,
    progress: bool,
):
    """Lists in time order: candidates (ranking-stage order), rank scores, attractions, the position each
    candidate was shown at (drawn by ``policy`` from the second generator) and the clicks under that order.

    Retrieval: a pool of distinct random items; the n_rel most relevant of its first `pool` items
    (Gumbel top-k on the current relevance) plus its last length - n_rel items (random ones). Before
    the val cut the pool holds only the first `known` items, redrawn from the third generator (so the
    other draws are those of a build without cold items).
    """
    cfg = world.cfg
    rng, order_rng, cold_rng = rngs
    items = len(world.item_vec)
    user = rng.choice(len(world.user_activity), size=n, p=world.user_activity / world.user_activity.sum())
    ts = np.sort(rng.integers(START, START + int(cfg.span_days * DAY), size=n))
    n_rel = min(length, max(1, round(cfg.relevant_fraction * length)))
    n_rand = length - n_rel
    pool = min(known - n_rand, max(RETRIEVAL_POOL, 4 * n_rel))
    training = ts < _cuts(ts)[0]
    cand = np.empty((n, length), dtype=np.int64)
    attraction = np.empty((n, length), dtype=np.float32)
    rank_score = np.empty((n, length), dtype=np.float32)
    clicks = np.empty((n, length), dtype=np.float32)
    shown_position = np.empty((n, length), dtype=np.float32)
    for s in _chunks(n, pool + n_rand, "lists", progress):
        drawn = _distinct(rng, s.stop - s.start, pool + n_rand, items)
        if known < items:
            early = np.flatnonzero(training[s])
            drawn[early] = _distinct(cold_rng, len(early), pool + n_rand, known)
        rel = world.relevance(user[s], ts[s], drawn)
        top = np.argpartition(-(rel[:, :pool] + _gumbel(rng, (len(rel), pool))), n_rel - 1, axis=1)[:, :n_rel]
        picked = np.concatenate([top, np.arange(pool, pool + n_rand) + np.zeros((len(rel), 1), np.int64)], axis=1)
        chosen = np.take_along_axis(drawn, picked, axis=1)
        stale = cfg.affinity_scale * np.einsum("nd,nld->nl", world.user_base[user[s]], world.item_vec[chosen])
        score = stale + cfg.quality_weight * world.item_quality_obs[chosen]
        score += cfg.rank_noise * rng.standard_normal(score.shape)
        order = np.argsort(-score, axis=1, kind="stable")
        cand[s] = np.take_along_axis(chosen, order, axis=1)
        score = np.take_along_axis(score, order, axis=1)
        rank_score[s] = score
        attraction[s] = cfg.bias + np.take_along_axis(rel, np.take_along_axis(picked, order, axis=1), axis=1)
        perm = policy.orders(score, order_rng)
        ranks = np.broadcast_to(np.arange(length, dtype=np.float32), perm.shape)
        np.put_along_axis(shown_position[s], perm, ranks, axis=1)
        shown = np.ones((len(rel), length), dtype=bool)
        clicks[s] = model.sample_clicks(attraction[s], world.item_category[cand[s]], shown, perm, rng)
    return user, ts, cand, rank_score, attraction, shown_position, clicks


def _history_windows(b_user, b_ts, user, ts, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """For each list, [start, end) into the (user, ts)-sorted log: the last max_history behaviours before ts."""
    t0 = min(b_ts.min(initial=START), ts.min())
    stride = max(b_ts.max(initial=START), ts.max()) - t0 + 1
    log_key = b_user * stride + (b_ts - t0)
    end = np.searchsorted(log_key, user * stride + (ts - t0), side="left")  # strictly before the list
    first = np.searchsorted(log_key, user * stride, side="left")
    return np.maximum(first, end - max_history), end


def _ragged(values: np.ndarray, start: np.ndarray, end: np.ndarray) -> list[np.ndarray]:
    """values[start[i]:end[i]] for each i, as a list of arrays (a list column)."""
    return [values[a:b] for a, b in zip(start.tolist(), end.tolist(), strict=True)]


def _numeric(name: str, values: np.ndarray) -> NumericFeature:
    std = float(np.std(values))
    return NumericFeature(name, float(np.mean(values)), std if std > 1e-6 else 1.0)


def _ids(prefix: str, n: int) -> np.ndarray:
    """Zero-padded ids, so that string order is index order (behaviours stay sorted by user_id)."""
    width = len(str(max(n - 1, 0)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def build_synthetic(
    out: Path,
    *,
    lists: int,
    users: int,
    items: int,
    list_length: int,
    max_history: int,
    seed: int,
    logging_policy: str | None = None,
    temperature: float | None = None,
    progress: bool = True,
    config: SimulatorConfig | None = None,
) -> dict:
    """Simulate a data set with known click model; returns write_dataset's stats (see docs/simulator.md).

    ``logging_policy`` and ``temperature`` (None: the defaults) are ``LoggingPolicy``'s.
    """
    _check_arguments(lists, users, items, list_length, max_history, seed)
    policy = LoggingPolicy(logging_policy, temperature)
    cfg = config or SimulatorConfig()
    cfg.check(items, list_length)
    model = ClickModel()
    rng = np.random.default_rng(seed)
    # spawning draws nothing from rng, so its stream is as without policies, content or cold items
    order_rng, content_rng, cold_rng = rng.spawn(3)
    world = World(cfg, model.n_categories, users, items, rng)
    known = items - cfg.n_cold(items)  # the last items are the cold ones: World draws items i.i.d.
    b_user, b_ts, b_item, b_click = _behaviours(world, cfg.behaviours_per_user * max(max_history, 10), rng, progress)
    user, ts, cand, rank_score, attraction, shown_position, clicks = _lists(
        world, model, policy, lists, list_length, (rng, order_rng, cold_rng), known, progress
    )
    cut = _cuts(ts)
    _rebrowse_before(world, (b_user, b_ts, b_item, b_click), known, int(cut[0]), cold_rng, progress)

    user_ids, item_ids = _ids("u", users), _ids("i", items)
    popularity = np.log1p(np.bincount(b_item[b_ts < START], minlength=items)).astype(np.float32)
    activity = np.log(world.user_activity).astype(np.float32)
    train = ts < cut[0]
    content = world.content(cfg.content_dim, cfg.content_noise, content_rng)
    content_features = tuple(_numeric(f"content_{j}", content[:known, j]) for j in range(cfg.content_dim))
    schema = FeatureSchema(
        n_items=items + 2,
        actions=ACTIONS,
        max_history=max_history,
        max_list=list_length,
        user_categorical=(CategoricalFeature("segment", cfg.n_segments + 2),),
        user_numeric=(_numeric("activity", activity),),
        item_categorical=(CategoricalFeature("category", model.n_categories + 2),),
        item_numeric=(
            _numeric("quality", world.item_quality_obs),
            _numeric("popularity", popularity),
            *content_features,
        ),
        candidate_numeric=(_numeric(RANK_SCORE, rank_score[train]),),
        label="click",
        item_content=tuple(f.name for f in content_features),
        known_items=known + 2 if known < items else 0,
        extra={"source": "synthetic", "seed": seed, "click_model": "simulator.json", **policy.describe()},
    )
    vocabs = Vocabularies(
        items=Vocab(list(item_ids)),
        user_categorical={"segment": Vocab([f"s{i}" for i in range(cfg.n_segments)])},
    )
    users_df = pd.DataFrame(
        {"user_id": user_ids, "segment": world.user_segment.astype(np.int64) + 2, "activity": activity}
    )
    items_df = pd.DataFrame(
        {
            "item_index": np.arange(items + 2, dtype=np.int64),
            "item_id": np.concatenate([["", ""], item_ids]).astype(object),
            "category": np.concatenate([[0, 0], world.item_category + 2]).astype(np.int64),
            "quality": np.concatenate([[0, 0], world.item_quality_obs]).astype(np.float32),
            "popularity": np.concatenate([[0, 0], popularity]).astype(np.float32),
            # reserved rows get the mean: standardised, "no content"
            **{f.name: np.r_[[f.mean] * 2, content[:, j]].astype(np.float32) for j, f in enumerate(content_features)},
        }
    )
    action_index = np.array([schema.action_index(a) for a in ACTIONS], dtype=np.int64)
    behaviours_df = pd.DataFrame(
        {
            "user_id": user_ids[b_user],
            "item_id": item_ids[b_item],
            "timestamp": b_ts.astype(np.int64),
            "action": np.array(ACTIONS, dtype=object)[b_click.astype(np.int64)],
        }
    )
    start, end = _history_windows(b_user, b_ts, user, ts, max_history)
    lists_df = pd.DataFrame(
        {
            "list_id": np.arange(lists, dtype=np.int64),
            "user_id": user_ids[user],
            "timestamp": ts.astype(np.int64),
            "items": list(cand + 2),
            "cand_rank_score": list(rank_score),
            "labels": list(clicks),
            "hist_items": _ragged(b_item + 2, start, end),
            "hist_ts": _ragged(b_ts.astype(np.int64), start, end),
            "hist_actions": _ragged(action_index[b_click.astype(np.int64)], start, end),
            "attraction": list(attraction),
            "category": list(world.item_category[cand].astype(np.float32)),
            SHOWN_POSITION: list(shown_position),
        }
    )
    split_of = np.select([train, ts < cut[1]], [0, 1], 2)
    splits = {name: lists_df[split_of == i].reset_index(drop=True) for i, name in enumerate(SPLITS)}
    with staged(out) as staging:
        stats = {
            **write_dataset(staging, schema, vocabs, users_df, items_df, behaviours_df, splits),
            **policy.describe(),
        }
        (staging / "stats.json").write_text(json.dumps(stats, indent=2))
        truth = {"item_content": content} if cfg.content_dim else {}
        if known < items:
            truth["item_cold"] = np.arange(items) >= known
        model.save(staging, {**world.arrays(), **truth}, cfg, policy)
    return stats

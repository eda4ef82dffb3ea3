r"""SMART-IQA trained from scratch on the built-in demo dataset, on a CPU.

  python -m smartiqa_jax.train --config configs/demo.py

No download: the demo images are made on first use from scikit-image's sample
photos with synthetic distortions (smartiqa_jax.data.demo), split by source
photo, so the test photos are never seen in training. With no pretrained
weights the backbone trains at the head's rate, with warmup and a per-step
cosine.

What it reaches (2026-11-27, session 13, 2-core CPU, demo dataset version 2): test
SRCC 0.822, PLCC 0.829 (seeds 1 and 2: 0.807, 0.736; 0.788 over the three), in 6 min 5 s
with the compilation cache warm (README, Training). Session 11's runs, the same but
for data.eval_symmetries (below), gave 0.817 / 0.7997 / 0.737. Session 7's figures below predate LayerNorm's exact variance
(session 10) and the hand-written softmax backward and erf GELU (session 11), which
changed only float rounding: the same three seeds gave 0.84 / 0.78 / 0.74 then, and
0.81 / 0.79 / 0.76 in session 10. Three changes of session 7 made the difference,
measured in full runs:
- model.patch_norm=False: Swin's LayerNorm after the patch embedding scales every
  4x4 patch's 16 responses to unit variance, so a 16-wide stage 0 cannot tell a
  noisy patch from a clean one by amplitude. Without it (session-6 config
  otherwise): best val 0.68 (epochs 2-8 rise smoothly, 0.51 -> 0.68 instead of
  swinging 0.37-0.68), test 0.61; noise on the test photos ranks at 0.75
  instead of 0.44, but JPEG is still not learned (0.09: every level scored ~72).
  With learning rates 2e-3 it does not train (val 0.1-0.2).
- data.jpeg_aligned_crops=True (with the above): JPEG at q=3 keeps the texture
  here (brick: detail 6.7 against 6.2 pristine) and adds 8x8 block edges; with
  random offsets an edge falls at any of 4 places in a patch or on its border.
  Crops at 2 past a multiple of 4 put every edge between a patch's 2nd and 3rd
  pixel: best val 0.73 (epoch 4), test 0.68; JPEG on the test photos 0.43 from
  0.09, on the training photos 0.67 from 0.35. (Session 5 aligned crops to
  multiples of 8, which puts the edges on patch borders: 0.27.)
- train.cpu_devices=2 (with both): the CPU as two data-parallel devices runs
  ~1.45x the steps per second (37 s an epoch against 54 s), and together with
  the glibc settings the whole run takes 7 min 39 s instead of 9 min 22 s. The
  same steps on the same data; only the float rounding differs (gradients are
  summed over two devices), and over 1310 steps that gives another trajectory:
  best val 0.76 (epoch 9; validation 0.74-0.76 over epochs 8-10 against
  0.66-0.70 on one device), test 0.84; JPEG on test 0.76, the training photos
  ranked at 0.91 overall. Seed 1: best val 0.67 (epoch 9, still rising), test
  0.78; seed 2: best val 0.65 (epoch 8), test 0.74 (8 min 9 s). So the two
  changes above are worth about +0.15-0.2 over the session-6 config (test
  0.62 / 0.59 for seeds 0 / 1), and runs of it spread by about +-0.05: 0.79
  over three seeds.
- Not used: 12 epochs instead of 10 (seed 0): best val 0.68 (epoch 10), test
  0.83, in 10 min 18 s (the VM was slower then, 42 s an epoch): no gain, and
  over the budget.
- Not used (session 8): learning rates 1.5e-3 (seed 1, the slow starter):
  validation -0.01, -0.15, 0.11 over epochs 1-3 (as slow a start as at 1e-3),
  best 0.70 at epoch 7, test 0.76 against 0.78. And more crops at test time do
  not move the three models above (4 random crops: 0.844 / 0.783 / 0.740; 16
  random: 0.845 / 0.782 / 0.741; a 3x3 grid: 0.851 / 0.779 / 0.744): what
  separates the seeds is the model, not the crops it is shown. Seeds 1 and 2
  learn late (validation 0.27 and 0.40 at epoch 3 against 0.53) and end with a
  higher training loss (0.17 against 0.10); what they rank worse is mostly
  downsampling (0.72 and 0.58 against 0.85) and noise (0.75, 0.80 against
  0.88).
- Not used (session 8): global-norm clipping at 10 instead of 1.0 (gradient
  norms run 2-20 through the whole run, so 1.0 clips nearly every step):
  seed 1's training loss still falls (0.96 -> 0.22) but validation never
  rises (0.02-0.19 over the 10 epochs): the clipping is part of what makes
  the run generalise.
- Not used (session 8): model.attention_dropout=0.0 (the stage-attention MLP's
  dropout, 0.5 as released, is the one dropout the demo still has). Seeds 0 / 1
  / 2: test 0.78 / 0.80 / 0.76 (best val 0.72 / 0.66 / 0.67 at epochs 6 / 8 /
  7; 7 min 27 s for seed 0), against 0.84 / 0.78 / 0.74: 0.78 over the three
  against 0.79. Seed 2 starts sooner (validation 0.49 at epoch 2 against 0.10),
  but the mean does not move.
- Not used (session 9): 11 epochs instead of 10 for the slow starter, seed 1
  (its validation was still rising at epoch 9-10): it learns sooner (validation
  0.55 at epoch 3 against 0.27), best val 0.70 at epoch 9, test 0.77 against
  0.78, in 12 min 50 s (the VM ran the step at ~38 images/s then, against ~64 in
  session 7's runs). No gain; seeds 2 and 0 were not run.
- Not used (session 11): 12 epochs, now that an epoch takes ~37 s. Seeds 0 / 1 / 2:
  test 0.782 / 0.779 / 0.775 (best val 0.68 / 0.67 / 0.69 at epochs 4 / 12 / 9; 6 min
  51 s, 6 min 55 s, 8 min 46 s) against 0.817 / 0.7997 / 0.737 with 10 epochs: 0.779
  over the three against 0.785. The seeds spread less, but the mean does not rise.
- Not used (session 12): test-time averaging over the 8 symmetries the crops are trained
  with (4 rotations x flip, each of the 4 crops), measured after the fact on session 11's
  three models (seeds 0 / 1 / 2): test 0.824 / 0.796 / 0.771 against 0.817 / 0.800 / 0.738
  (0.797 against 0.785 over the three), validation 0.677 / 0.720 / 0.671 against 0.681 /
  0.713 / 0.642. It would cost 8x every evaluation pass (about 30 s more per epoch's
  validation here, 5 minutes over the run) for +0.01 on average, and seed 1 stays under
  0.80.
- data.eval_symmetries=2 (session 13): each validation and test crop scored as the mean
  of itself and its mirror image. Chosen on validation: on four fixed models (seeds
  0 / 1 / 2 at their best epochs, and session 11's 12-epoch seed 0), scored with 4
  random crops, validation SRCC averaged 0.680 with the crops alone, 0.692 with their
  mirror images (2x the model calls), 0.685 with their 4 rotations (4x) and 0.688 with
  all 8 (8x); 2 crops with their mirror images (the calls of now) 0.681. Test moved
  with it: 0.784 -> 0.791 (rotations 0.797, all 8 0.797; validation does not prefer
  them). In full runs the training is the same step for step, so only the validation,
  the best epoch's choice (unchanged: 6 / 10 / 8) and the test scoring differ: test
  0.822 / 0.807 / 0.736 against 0.817 / 0.7997 / 0.737, in 6 min 5 s / 5 min 54 s /
  5 min 54 s (the validation passes cost about 3 s more an epoch).
- Not used (session 13): the mean of the last epochs' parameters (stochastic weight
  averaging, over the 3 or 5 last epoch ends, or over every checkpoint of the second
  half), measured after the fact on the three seeds' runs: test 0.839 / 0.794 / 0.745
  (last 3) against 0.838 / 0.800 / 0.749 for the last epoch alone, validation 0.593 /
  0.713 / 0.623 against 0.598 / 0.713 / 0.620: no gain. The last epoch itself tested
  higher than the epoch validation chose in two of the three runs (0.838 against
  0.817, 0.749 against 0.737), while validation (2 photos) rated it lower; the
  protocol keeps choosing on validation.
- Not used (session 13): optim.warmup_epochs=1.0 instead of 0.5 (with the mirror
  images above). Seeds 0 / 1 / 2: best validation 0.643 / 0.718 / 0.660 (epochs 3 / 10 /
  7) against 0.694 / 0.718 / 0.660, test 0.719 / 0.809 / 0.752 against 0.822 / 0.807 /
  0.736. Seeds 1 and 2 start sooner (validation 0.28 and 0.45 at epoch 2 against 0.06
  and 0.08), and seed 2 ends with a lower training loss (0.12 against 0.16), but seed 0
  loses more than they gain, and validation prefers the shorter warmup.

Earlier: full 10-epoch runs of the session-6 config (patch norm, unaligned
crops, one CPU device) with one change each (1310 steps of 16;
validation 2 photos, test 3, so differences of ~0.1 are noise; "best val" is
the epoch the run keeps, and test is measured there):
- loss plcc (this config):       best val 0.68, test 0.62; seed 1: 0.65 / 0.59.
  Validation swings (0.37-0.68 between epochs) but stays above L1's.
- learning rates 2e-3 (plcc):    best val 0.57, test 0.69. Kept at 1e-3,
  which validation prefers: choosing by the test figure would be choosing
  on test, and with 3 test photos it is as noisy as validation.
- loss l1:                       best val 0.56, test 0.54.
- loss l2:                       best val 0.60, test 0.39.
- l1 without rotate90:           best val 0.53 at epoch 5, then falling to
  0.39 by epoch 10 (training loss still falling: it fits the 8 training
  photos); test 0.53.
- Version 1 of the dataset with the earlier config (l1, timm init, no
  rotate90): test 0.31, the training loss barely moving (19.4 -> 16.4).

Why these settings:
- 'pico' (a 16-wide Swin, one block per stage): 2-3x nano's images per
  second, so 1310 steps of 16 fit in the budget.
- backbone_init='fan_in': with timm's 0.02 init a 16-wide Swin starts as
  nearly the identity and nearly linear, and learns nothing in the budget
  (pico with a linear head on pooled stage features, 600 steps: L1 19.5 ->
  18.8 with timm's init, 23.5 -> 15.2 and validation SRCC 0.40 with fan_in).
- rotate90 (with the flip: all 8 symmetries of the crop): 8x the content
  seen by a model that otherwise starts fitting the training photos.
- loss 'plcc' (1 - Pearson of the batch, the paper's "SRCC loss") learns the
  ranking faster than L1 here; it is blind to scale and offset, so
  train.calibrate fits score = a * prediction + b on the training images at
  the end and folds it into the score layers (the model in workdir/model
  predicts 0..100 pseudo-MOS).
- score_scale='label_std' and hyper_conv_init='kaiming': with them the head
  leaves the constant prediction under L1 (measured on version 1); kept,
  not measured again under plcc.
- Not used: crop offsets on multiples of 8, so that JPEG's 8x8 block grid
  sits on the 4x4 patch grid in every crop (tried in session 5): best val
  0.71, test 0.65, final training loss 0.10 against 0.21; the model then
  ranks JPEG on its training photos at 0.53 instead of 0.27. Within the
  noise, and scoring would have to align its crops too.
- Not used: an exponential moving average of the parameters (decay 0.995
  with a (1+t)/(10+t) warm-up, validated and tested instead of the raw
  parameters; tried in session 5): best val 0.62 at epoch 6, test 0.62.
  Validation is smoother but still falls after epoch 6 (0.53 to 0.42): the
  model starts fitting the 8 training photos, with or without averaging.
- Not used: dropout 0.1 with drop path 0.1 (session 5): best val 0.61 at
  epoch 8, test 0.50.
- Not used: more training content: the training photos cut with windows
  that overlap by half, up to 8 per photo (43 regions instead of 17, 1333
  images; 2 crops per image and 8 epochs for the same 1333 steps; session 6):
  best val 0.66 at the last epoch, test 0.59. Validation no longer falls at
  the end, but it gets no higher: in ~1300 steps the model is limited by how
  much it learns, not by how many photos it sees.
- Not used: loss fidelity (pairwise, scale 10; session 6): best val 0.61 at
  epoch 8, test 0.62, the same as plcc.
- Not used: the patch embedding initialised with a 4x4 DCT basis (luma
  frequencies, lowest first, and two colour-opponent means; session 6):
  it learns more slowly (training loss 0.39 and validation 0.50 at epoch 7,
  against 0.25 and 0.68); stopped there.
- Not used either: more training content from procedural "dead leaves" images
  (tried on version 1 of the dataset, 3 epochs: validation 0.36 / test 0.31,
  as without them; with fan_in 0.19 / 0.21), and Adam's b2=0.99 (600 steps:
  no gain).
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.variant = 'pico'
    config.model.fusion = 'attention'
    config.model.score_bias_init = 'mean_label'
    config.model.score_scale = 'label_std'
    config.model.hyper_conv_init = 'kaiming'
    config.model.backbone_init = 'fan_in'
    config.model.patch_norm = False          # keeps each patch's amplitude: noise levels
    config.model.dropout = 0.0               # a 10-minute run underfits; nothing to regularise

    config.data.dataset = 'demo'
    config.data.root = '~/.cache/smartiqa_jax/demo'
    config.data.label_name = 'demo pseudo-MOS'
    config.data.resize = ()                  # keep the 240x320 demo images
    config.data.patches_per_image = 4
    config.data.eval_crops = 4
    config.data.eval_symmetries = 2          # each crop and its mirror image (session 13)
    config.data.cache = True
    config.data.rotate90 = True
    config.data.jpeg_aligned_crops = True    # JPEG block edges at one place inside the patches

    config.train.batch_size = 16
    config.train.loss = 'plcc'
    config.train.calibrate = True            # plcc is scale-free: back to 0..100 at the end
    config.train.eval_batch_size = 32
    config.train.cpu_devices = 2             # the CPU as 2 data-parallel devices: ~1.3x steps/s
    config.train.num_epochs = 10
    config.train.patience = 0                # off: the short cosine run ends at its best
    config.train.log_every_steps = 10
    config.train.checkpoint_every_steps = 100

    config.optim.warmup_epochs = 0.5
    config.optim.schedule_unit = 'step'
    config.optim.backbone.lr = 1e-3
    config.optim.backbone.min_lr = 1e-5
    config.optim.backbone.weight_decay = 0.05
    config.optim.head.lr = 1e-3
    config.optim.head.min_lr = 1e-5
    config.optim.head.weight_decay = 0.05
    return config

import numpy as np, torch, nibabel as nb
torch.set_num_threads(1)
exec(open(__import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), 'field_diag.py')).read().split("model, meta")[0].replace("weights = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != '-' else None", "weights=None").replace("scale = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0", "scale=1.0"))
from keyprep.pipeline.carl.losses import pair_loss
from keyprep.pipeline.carl.network import load_carl, normalise_intensity
vfwd = (field.map(pts) - pts).reshape(grid.shape + (3,)) / 2.0
f = torch.as_tensor(normalise_intensity(fixed)).float()[None, None].clamp(0, 1)
m = torch.as_tensor(normalise_intensity(moving)).float()[None, None].clamp(0, 1)
moving_b, fixed_b = torch.cat([m, f]), torch.cat([f, m])
t = lambda a: torch.as_tensor(np.moveaxis(a, -1, 0)).float()[None]
model, _ = load_carl(None)
with torch.no_grad():
    unet = model(moving_b, fixed_b).float()
for name, u in [('zero', torch.zeros(2, 3, 96, 96, 96)), ('half truth', 0.5 * torch.cat([t(dtrue), t(vfwd)])),
                ('truth', torch.cat([t(dtrue), t(vfwd)])), ('network', unet)]:
    for sq in (True, False):
        g = torch.Generator().manual_seed(0)
        terms = pair_loss(moving_b, fixed_b, u, lam=1.5, squared=sq, generator=g, stride=2)
        print(f'{name:11s} sq={sq}: sim {float(terms["sim"]):.4f} reg {float(terms["reg"]):.4f} total {float(terms["loss"]):.4f}')

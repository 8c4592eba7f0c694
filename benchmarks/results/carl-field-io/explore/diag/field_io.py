import sys, time, numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1)
exec(open(__import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), 'loss_diag.py')).read().split("for name, u in")[0])
from keyprep.pipeline.carl.losses import pair_loss
def evalu(uf, tag, t0):
    d = uf[0].numpy()
    dd = np.moveaxis(d, 0, -1)
    err = np.linalg.norm(dd[mask] - dtrue[mask], axis=-1)
    # folding: jacobian det of x + d
    g = np.stack(np.gradient(d, axis=(1, 2, 3)), 1) + np.eye(3)[:, :, None, None, None]
    J = np.linalg.det(np.moveaxis(g, (0, 1), (-2, -1)))
    print(f'{tag}: AAL dice {dice(warp_lab(maal, d), faal):.3f} EPE {err.mean():.2f} fold% {100*(J[mask]<=0).mean():.4f} '
          f'stdlogJ {np.log(np.clip(J[mask],1e-3,None)).std():.3f} {time.time()-t0:.1f}s', flush=True)
evalu(unet[:1], 'network', time.time())
for level, lr, steps, lam in [(1, float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))]:
    t0 = time.time()
    s = 2 ** level
    r = torch.zeros(2, 3, 96 // s, 96 // s, 96 // s, requires_grad=True)
    opt = torch.optim.Adam([r], lr=lr)
    g = torch.Generator().manual_seed(0)
    for it in range(steps):
        u = unet + F.interpolate(r, size=(96, 96, 96), mode='trilinear', align_corners=False)
        terms = pair_loss(moving_b, fixed_b, u, lam=lam, squared=True, generator=g, stride=2)
        opt.zero_grad(); terms['loss'].backward(); opt.step()
        if it % 10 == 9 or it == steps - 1:
            print(it + 1, round(float(terms['sim']), 4), round(float(terms['reg']), 4))
            with torch.no_grad():
                evalu(u.detach()[:1], f'level {level} lr {lr} step {it+1}', t0)

"""
The diffusion maths of SD 1.5 that DTC uses unchanged: the DDPM noise schedule, the forward process, eps / v /
x0 conversions, and one DDIM or DDPM step. Nothing here knows about DTC; dtc.py's diffusion_loss and
sample_latents call it. Tested step by step against diffusers' DDIMScheduler and DDPMScheduler.
"""
import torch


class Schedule:
    """SD 1.5 / PBE configs/v1.yaml: 1000 steps, betas = linspace(sqrt(0.00085), sqrt(0.012))^2 ("scaled_linear").
    Computed in float32 as diffusers does, so our DDIM steps equal DDIMScheduler's exactly."""

    def __init__(self, num_steps=1000, beta_start=0.00085, beta_end=0.012):
        self.num_steps = num_steps
        self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)

    def _a(self, t, x):
        return self.alphas_cumprod.to(x.device)[t].view(-1, *[1] * (x.ndim - 1)).to(torch.float32)

    def add_noise(self, z0, noise, t):
        """Forward process q(z_t | z0) (DDPM Eq. 4): sqrt(a_t) z0 + sqrt(1 - a_t) eps."""
        a = self._a(t, z0)
        return (a.sqrt() * z0.float() + (1 - a).sqrt() * noise.float()).to(z0.dtype)

    def predict_x0(self, z_t, eps, t):
        """x0 from eps (DDPM Eq. 15): (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
        a = self._a(t, z_t)
        return ((z_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()).to(z_t.dtype)

    def eps_from(self, out, z_t, t, prediction):
        """The U-Net's output as eps: itself, or from v (eps = sqrt(a_t) v + sqrt(1 - a_t) z_t)."""
        if prediction == "eps":
            return out
        a = self._a(t, z_t)
        return (a.sqrt() * out.float() + (1 - a).sqrt() * z_t.float()).to(out.dtype)

    def v_target(self, z0, eps, t):
        """v = sqrt(a_t) eps - sqrt(1 - a_t) z0, the target of a v-prediction network."""
        a = self._a(t, z0)
        return (a.sqrt() * eps.float() - (1 - a).sqrt() * z0.float()).to(z0.dtype)

    def ddim_timesteps(self, steps):
        """SD's "leading" spacing with offset 1: 50 steps -> [981, 961, ..., 1]. Only at num_steps steps (1000) would
        the offset push the first step past the schedule's last timestep (999): there every timestep is visited,
        999, 998, ..., 0. Python ints, which the sampling loop takes one by one (and fake tensors, bench.py's memory
        simulation, have no values to give)."""
        spacing = self.num_steps // steps
        offset = 1 if (steps - 1) * spacing + 1 < self.num_steps else 0
        return [i * spacing + offset for i in reversed(range(steps))]

    def ddim_step(self, z_t, eps, t, t_prev, eta=0.0, generator=None):
        """DDIM (Song et al. 2021, Eq. 12). t_prev < 0 uses alphas_cumprod[0] (SD: set_alpha_to_one=False)."""
        ac = self.alphas_cumprod
        a_t, a_prev = ac[t], ac[max(t_prev, 0)]
        x0 = (z_t.float() - (1 - a_t).sqrt() * eps.float()) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps.float()
        if eta > 0:
            z = z + sigma * torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        return z.to(z_t.dtype)

    def ddpm_step(self, z_t, eps, t, generator=None):
        """Ancestral DDPM step (Ho et al. 2020, Eq. 6-7) with the posterior variance ("fixed_small")."""
        ac = self.alphas_cumprod
        a_t, a_prev = ac[t], (ac[t - 1] if t > 0 else torch.tensor(1.0))
        beta_t = 1 - a_t / a_prev
        x0 = (z_t.float() - (1 - a_t).sqrt() * eps.float()) / a_t.sqrt()
        mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + ((1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t)) * z_t.float()
        if t > 0:
            var = (1 - a_prev) / (1 - a_t) * beta_t
            mean = mean + var.clamp(min=1e-20).sqrt() * torch.randn(z_t.shape, generator=generator).to(z_t.device)
        return mean.to(z_t.dtype)

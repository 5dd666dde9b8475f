// Saved UI workflows store a node's widget values by POSITION (`widgets_values`). The sampler's
// widgets were reordered to KSampler's (seed, control, steps, cfg, sampler_name, scheduler,
// denoise, then Mochi's extras) and `schedule` stopped being a widget, so a list saved with an
// earlier layout is read here by its own layout's names and handed back in the node's order.
// Pure: no imports, so tests run it under Node as well.

// Earlier layouts of MochiXDiTSampler's widget values, oldest first. Each starts with the same six:
const FIRST = ["seed", "control_after_generate", "steps", "cfg", "schedule", "denoise"];
export const EARLIER_SAMPLER_LAYOUTS = [
  FIRST,                                                              // nodes 0.1 (first release)
  [...FIRST, "cache", "cache_threshold"],                             // + step caching
  [...FIRST, "sampler_name", "scheduler", "cache", "cache_threshold"], // + ComfyUI samplers
];
const DENOISE_AT = FIRST.indexOf("denoise");

// The earlier layout `values` was saved with, or null for the current one: every earlier layout
// has the denoise number at index 5, where the current layout has the scheduler's name.
export function earlierLayout(values) {
  if (!Array.isArray(values) || typeof values[DENOISE_AT] !== "number") return null;
  const fits = EARLIER_SAMPLER_LAYOUTS.filter((names) => names.length <= values.length);
  return fits.length ? fits[fits.length - 1] : null;
}

// `values` saved with an earlier layout, in the order of `widgetNames` (the node's widgets now).
// A name the old list lacks keeps `defaults[name]`; a list saved before `scheduler` existed ran
// with its `schedule`, so that becomes the scheduler (and the sampler euler, the only one then).
// Returns `values` unchanged when it already has the current layout.
export function remapSamplerWidgets(values, widgetNames, defaults = {}) {
  const names = earlierLayout(values);
  if (names === null) return values;
  const byName = { ...defaults };
  names.forEach((name, index) => { byName[name] = values[index]; });
  if (!names.includes("scheduler")) {
    byName.scheduler = byName.schedule;
    byName.sampler_name = "euler";
  }
  return widgetNames.map((name) => byName[name]);
}

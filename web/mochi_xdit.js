// ComfyUI frontend extension of the Mochi xDiT pack: opens sampler nodes saved with an earlier
// widget layout with the same values in the same meaning (see widget_layouts.js).
import { app } from "../../scripts/app.js";
import { remapSamplerWidgets } from "./widget_layouts.js";

app.registerExtension({
  name: "MochiXDiT.SamplerWidgetLayout",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "MochiXDiTSampler") return;
    const configure = nodeType.prototype.configure;
    // The frontend assigns widgets_values by position inside configure(); remap before it does.
    nodeType.prototype.configure = function (data) {
      const widgets = (this.widgets ?? []).filter((widget) => widget.serialize !== false);
      const defaults = Object.fromEntries(widgets.map((widget) => [widget.name, widget.value]));
      const remapped = remapSamplerWidgets(data.widgets_values, widgets.map((widget) => widget.name), defaults);
      if (remapped !== data.widgets_values) {
        console.info(`Mochi xDiT: sampler node ${data.id} was saved with an earlier widget layout; values kept by name`);
        data = { ...data, widgets_values: remapped };
      }
      return configure.call(this, data);
    };
  },
});

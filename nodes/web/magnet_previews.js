// MAGNeT Train LoRA plays its preview clips on the node: it gets the audio player ComfyUI's own audio nodes
// have (the frontend's AUDIO_UI widget, which shows the `audio` entry of a node's UI output; never sent to
// the server).
import { app } from "../../scripts/app.js";

app.registerExtension({
    name: "MAGNeT.TrainPreviews",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name === "MagnetTrainLora") {
            nodeData.input = nodeData.input || {};
            nodeData.input.required = nodeData.input.required || {};
            nodeData.input.required.audioUI = ["AUDIO_UI", {}];
        }
    },
});

"""The four detectors (R-CNN, Fast R-CNN, SPPnet, Faster R-CNN), one paper file each, the Detector
interface and registry they register in, the parts they compose (parts/) and the runtime helpers they
and the harness use (runtime/)."""

#!/usr/bin/env bash
# Download and unpack Pascal VOC2007 (trainval + test) into datasets/data/VOCdevkit/VOC2007, where the
# paper-scale configs look for it. Needs the internet; about 900 MB. Usage: scripts/fetch_voc2007.sh [DIR]
set -euo pipefail
dest="${1:-datasets/data}"
base="${VOC_MIRROR:-http://host.robots.ox.ac.uk/pascal/VOC/voc2007}"
mkdir -p "$dest"
cd "$dest"
for tar in VOCtrainval_06-Nov-2007.tar VOCtest_06-Nov-2007.tar; do
  if [ ! -f "$tar" ]; then
    echo "downloading $tar"
    curl -fL --retry 3 -o "$tar.part" "$base/$tar"
    mv "$tar.part" "$tar"
  fi
  echo "unpacking $tar"
  tar -xf "$tar"
done
voc="VOCdevkit/VOC2007"
for split in trainval test; do
  test -s "$voc/ImageSets/Main/$split.txt" || { echo "$voc/ImageSets/Main/$split.txt missing after unpacking" >&2; exit 1; }
done
echo "VOC2007 ready at $dest/$voc: $(wc -l < "$voc/ImageSets/Main/trainval.txt") trainval, $(wc -l < "$voc/ImageSets/Main/test.txt") test images"

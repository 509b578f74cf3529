"""mmseg 0.x's code as DyT's dense-task configs run it, transcribed line for line (global numpy draws,
``from numpy import random`` as mmseg writes it), for the tests to compare tieta.dense against.

Sources: mmseg/datasets/pipelines/loading.py (LoadAnnotations), transforms.py (Resize, RandomCrop,
RandomFlip, PhotoMetricDistortion, Pad), mmcv/image/geometric.py (rescale_size, _scale_size),
mmseg/core/evaluation/metrics.py (intersect_and_union, total_area_to_metrics). OpenCV is not
installed here: ``bgr2hsv`` / ``hsv2bgr`` are passed in (tieta's transcriptions of OpenCV's).
"""

from collections import OrderedDict

import numpy as np
import torch
from numpy import random


def reduce_zero_label(gt_semantic_seg):
    # LoadAnnotations, reduce_zero_label=True
    gt_semantic_seg = gt_semantic_seg.copy()
    gt_semantic_seg[gt_semantic_seg == 0] = 255
    gt_semantic_seg = gt_semantic_seg - 1
    gt_semantic_seg[gt_semantic_seg == 254] = 255
    return gt_semantic_seg


def _scale_size(size, scale):
    if isinstance(scale, (float, int)):
        scale = (scale, scale)
    w, h = size
    return int(w * float(scale[0]) + 0.5), int(h * float(scale[1]) + 0.5)


def rescale_size(old_size, scale):
    w, h = old_size
    max_long_edge = max(scale)
    max_short_edge = min(scale)
    scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w))
    return _scale_size(old_size, scale_factor)


def random_sample_ratio(img_scale, ratio_range):
    # Resize._random_sample_ratio
    min_ratio, max_ratio = ratio_range
    ratio = np.random.random_sample() * (max_ratio - min_ratio) + min_ratio
    scale = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
    return scale, None


class RandomCrop:
    def __init__(self, crop_size, cat_max_ratio=1., ignore_index=255):
        self.crop_size = crop_size
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def get_crop_bbox(self, img):
        margin_h = max(img.shape[0] - self.crop_size[0], 0)
        margin_w = max(img.shape[1] - self.crop_size[1], 0)
        offset_h = np.random.randint(0, margin_h + 1)
        offset_w = np.random.randint(0, margin_w + 1)
        crop_y1, crop_y2 = offset_h, offset_h + self.crop_size[0]
        crop_x1, crop_x2 = offset_w, offset_w + self.crop_size[1]
        return crop_y1, crop_y2, crop_x1, crop_x2

    def crop(self, img, crop_bbox):
        crop_y1, crop_y2, crop_x1, crop_x2 = crop_bbox
        img = img[crop_y1:crop_y2, crop_x1:crop_x2, ...]
        return img

    def __call__(self, results):
        img = results['img']
        crop_bbox = self.get_crop_bbox(img)
        if self.cat_max_ratio < 1.:
            # Repeat 10 times
            for _ in range(10):
                seg_temp = self.crop(results['gt_semantic_seg'], crop_bbox)
                labels, cnt = np.unique(seg_temp, return_counts=True)
                cnt = cnt[labels != self.ignore_index]
                if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < self.cat_max_ratio:
                    break
                crop_bbox = self.get_crop_bbox(img)
        img = self.crop(img, crop_bbox)
        results['img'] = img
        results['gt_semantic_seg'] = self.crop(results['gt_semantic_seg'], crop_bbox)
        return results


class PhotoMetricDistortion:
    def __init__(self, bgr2hsv, hsv2bgr, brightness_delta=32, contrast_range=(0.5, 1.5),
                 saturation_range=(0.5, 1.5), hue_delta=18):
        self.bgr2hsv, self.hsv2bgr = bgr2hsv, hsv2bgr
        self.brightness_delta = brightness_delta
        self.contrast_lower, self.contrast_upper = contrast_range
        self.saturation_lower, self.saturation_upper = saturation_range
        self.hue_delta = hue_delta

    def convert(self, img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    def brightness(self, img):
        if random.randint(2):
            return self.convert(img, beta=random.uniform(-self.brightness_delta, self.brightness_delta))
        return img

    def contrast(self, img):
        if random.randint(2):
            return self.convert(img, alpha=random.uniform(self.contrast_lower, self.contrast_upper))
        return img

    def saturation(self, img):
        if random.randint(2):
            img = self.bgr2hsv(img)
            img[:, :, 1] = self.convert(img[:, :, 1],
                                        alpha=random.uniform(self.saturation_lower, self.saturation_upper))
            img = self.hsv2bgr(img)
        return img

    def hue(self, img):
        if random.randint(2):
            img = self.bgr2hsv(img)
            img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-self.hue_delta, self.hue_delta)) % 180
            img = self.hsv2bgr(img)
        return img

    def __call__(self, results):
        img = results['img']
        # random brightness
        img = self.brightness(img)
        # mode == 0 --> do random contrast first
        # mode == 1 --> do random contrast last
        mode = random.randint(2)
        if mode == 1:
            img = self.contrast(img)
        # random saturation
        img = self.saturation(img)
        # random hue
        img = self.hue(img)
        # random contrast
        if mode == 0:
            img = self.contrast(img)
        results['img'] = img
        return results


def random_flip(results, prob):
    # RandomFlip, horizontal
    flip = True if np.random.rand() < prob else False
    if flip:
        results['img'] = np.flip(results['img'], axis=1)
        results['gt_semantic_seg'] = np.flip(results['gt_semantic_seg'], axis=1).copy()
    return results


def intersect_and_union(pred_label, label, num_classes, ignore_index):
    mask = (label != ignore_index)
    pred_label = pred_label[mask]
    label = label[mask]

    intersect = pred_label[pred_label == label]
    area_intersect = torch.histc(intersect.float(), bins=(num_classes), min=0, max=num_classes - 1)
    area_pred_label = torch.histc(pred_label.float(), bins=(num_classes), min=0, max=num_classes - 1)
    area_label = torch.histc(label.float(), bins=(num_classes), min=0, max=num_classes - 1)
    area_union = area_pred_label + area_label - area_intersect
    return area_intersect, area_union, area_pred_label, area_label


def total_area_to_metrics(total_area_intersect, total_area_union, total_area_pred_label, total_area_label):
    all_acc = total_area_intersect.sum() / total_area_label.sum()
    ret_metrics = OrderedDict({'aAcc': all_acc})
    iou = total_area_intersect / total_area_union
    acc = total_area_intersect / total_area_label
    ret_metrics['IoU'] = iou
    ret_metrics['Acc'] = acc
    ret_metrics = {metric: value.numpy() for metric, value in ret_metrics.items()}
    return ret_metrics


def summary(ret_metrics):
    # CustomDataset.evaluate: the means as fractions (mmseg prints them x 100, rounded)
    return {'aAcc': float(ret_metrics['aAcc']), 'mIoU': float(np.nanmean(ret_metrics['IoU'])),
            'mAcc': float(np.nanmean(ret_metrics['Acc']))}

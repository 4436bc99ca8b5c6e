-- Orthanc: auto-forward each stable CT series to the triage node, in one association per series.
-- Install: add this file to "LuaScripts" in orthanc.json and register the node in
-- "DicomModalities" under the name below.  Used as is by the tests (tests/peers.py).
local TARGET = "triage"      -- DicomModalities name of the node
local TARGET_AET = "TRIAGE"  -- the node's AE title (loop guard)

function OnStableSeries(seriesId, tags, metadata)
  -- Only CT images: never SRs (the node's own results land in the same study), never other modalities.
  if tags['Modality'] ~= 'CT' then
    print('forward: skip ' .. tostring(tags['Modality']) .. ' series ' .. seriesId)
    return
  end
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  if series == nil or series['Instances'] == nil or series['Instances'][1] == nil then
    return
  end
  -- Loop guard: never send back what came from the node (e.g. pulled or re-sent data).
  local first = series['Instances'][1]
  local ok, remote = pcall(RestApiGet, '/instances/' .. first .. '/metadata/RemoteAET')
  if ok and remote ~= nil and remote == TARGET_AET then
    print('forward: loop guard, series ' .. seriesId .. ' came from ' .. remote)
    return
  end
  print('forward: series ' .. seriesId .. ' to ' .. TARGET)
  -- Orthanc does not retry a failed forward: the node's catch-up (C-FIND + pull) covers that.
  RestApiPost('/modalities/' .. TARGET .. '/store',
              DumpJson({Resources = {seriesId}, Synchronous = false}, true))
end
